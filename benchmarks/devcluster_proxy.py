"""Node agent + service proxy benchmark on a running dev cluster.

Measures, with the echo helper (`fleetserve dev-cluster echo`):
  * pods: create a 2-replica Deployment -> 2/2 Ready (the agent's start + the readiness probe);
  * follow: a pod turns unready -> its EndpointSlice endpoint is ready=false -> the proxy
    stops sending it traffic (the proxy's own lag is the second step);
  * overhead: sequential GET latency through the proxy vs. straight to a pod IP
    (the baseline, measured in the same run).

    .venv/bin/python benchmarks/devcluster_proxy.py [--state-dir DIR] [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from fleetserve_devcluster.controlplane import default_state_dir
from fleetserve_devcluster.kube import Kube
from fleetserve_devcluster.testing import DevClusterHandle, cluster_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from nodeagent_util import PORT, echo_deployment, http, ready_pods  # noqa: E402


def ms(values: list[float]) -> str:
    q = statistics.quantiles(values, n=20)
    return f"median {statistics.median(values) * 1e3:.2f} ms, p95 {q[18] * 1e3:.2f} ms"


def get_latencies(url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as resp:
            resp.read()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    state = (args.state_dir or default_state_dir()).resolve()
    cluster = DevClusterHandle(state, state / "kubeconfig", cluster_env(state), False)
    kube = Kube.from_kubeconfig(state / "kubeconfig", secrets_dir=Path(tempfile.mkdtemp(prefix="bench-kube-")))
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", ns)
    try:
        t0 = time.monotonic()
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(echo_deployment("web", 2)))
        while len(ready_pods(cluster, ns, "app=web")) < 2:
            time.sleep(0.05)
        t_ready = time.monotonic() - t0
        cluster.kubectl("expose", "deployment", "web", "-n", ns, "--port", "80", "--target-port", str(PORT))
        while not (svc := json.loads(cluster.kubectl("get", "svc", "web", "-n", ns, "-o", "json").stdout))[
                "metadata"].get("annotations", {}).get("fleetserve.io/proxy-address"):
            time.sleep(0.05)
        address = svc["metadata"]["annotations"]["fleetserve.io/proxy-address"]
        pods = ready_pods(cluster, ns, "app=web")
        while len({json.loads(http("GET", f"http://{address}/")[1] or "{}").get("pod") for _ in range(6)}) < 2:
            time.sleep(0.1)

        victim = pods[0]
        ip = victim["status"]["podIP"]
        direct = get_latencies(f"http://{ip}:{PORT}/", args.requests)
        proxied = get_latencies(f"http://{address}/", args.requests)

        t0 = time.monotonic()
        http("POST", f"http://{ip}:{PORT}/control/ready?value=false")
        t_slice = t_proxy = None
        while t_slice is None or t_proxy is None:
            # Each time is taken after its observation: an upper bound, within one poll (~10 ms).
            if t_slice is None:
                slices = kube.get(f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices")["items"]
                if any(ep["addresses"][0] == ip and ep["conditions"].get("ready") is False
                       for s in slices for ep in s.get("endpoints") or []):
                    t_slice = time.monotonic() - t0
            if t_proxy is None and all(json.loads(http("GET", f"http://{address}/")[1])["pod"] !=
                                       victim["metadata"]["name"] for _ in range(4)):
                t_proxy = time.monotonic() - t0
        print(f"pods: 2/2 Ready {t_ready:.2f} s after create")
        print(f"follow: EndpointSlice ready=false {t_slice:.2f} s after the pod turned unready "
              f"(readiness period 1 s), proxy stopped routing to it at {t_proxy:.2f} s "
              f"(proxy lag {max(t_proxy - t_slice, 0):.2f} s)")
        print(f"direct to pod IP (baseline), {args.requests} GETs: {ms(direct)}")
        print(f"through the service proxy,   {args.requests} GETs: {ms(proxied)}")
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
