"""fleetserve_operator: the kopf operator for LLMDeployment."""
