"""fleetserve_devcluster: a real Kubernetes control plane on loopback, a node agent and a service proxy for tests and the demo."""
