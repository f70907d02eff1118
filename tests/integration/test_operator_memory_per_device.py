"""The memory-fit proof on the real API server is per device (the real operator, KopfRunner).

Llama-3.1-70B nf4 on a pod with 2 x 16 GiB GPUs: the server splits the model
over its two GPUs (tensor parallelism, one rank per GPU), so each 16 GiB device
must hold its 18.9 GiB shard — MemoryFits=False, no Deployment, and
status.memory says what one device holds, with the way out (4 GPUs). Adding up
the two GPUs' memory would have claimed it fits. (On 2 x 24 GiB it fits:
tests/unit/test_operator_fit.py.)
"""

from __future__ import annotations

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from operator_harness import (
    apply,
    condition,
    events_for,
    example,
    get,
    install_crds,
    list_kind,
    operator,
    wait_until,
)

GiB = 2**30
NAME = "llama-3-1-70b"


@pytest.fixture(scope="module", autouse=True)
def crds(dev_cluster: DevClusterHandle) -> None:
    install_crds(dev_cluster)


def test_70b_nf4_on_two_16gib_gpus_gets_the_per_device_answer(dev_cluster: DevClusterHandle, namespace: str) -> None:
    body = example("llama-3.1-70b-does-not-fit.yaml", quantization="nf4",
                   resources={"gpus": 2, "gpuMemory": "16Gi", "cpu": "8", "memory": "64Gi"},
                   engine={"maxModelLen": 8192, "maxNumSeqs": 16})
    with operator(dev_cluster, namespace):
        apply(dev_cluster, namespace, body)
        cr = wait_until(lambda: (c := get(dev_cluster, namespace, "llmd", NAME)) and condition(c, "MemoryFits")
                        and (c.get("status") or {}).get("memory") and c, 30, "MemoryFits on the 70B")
        fits = condition(cr, "MemoryFits")
        assert fits is not None and (fits["status"], fits["reason"]) == ("False", "DoesNotFit"), fits
        # the device-level shortfall and the way out, in the condition a user reads
        assert "does not fit on each of 2 devices" in fits["message"] and "18.9 GiB for weights" in fits["message"]
        assert "6.6 GiB short per device" in fits["message"] and "use 4 GPUs" in fits["message"]
        memory = cr["status"]["memory"]
        assert memory["fits"] is False and memory["kvCapacityTokens"] == 0
        assert memory["availableBytes"] == 16 * GiB  # one device, not 2 x 16 GiB
        assert memory["devices"] == 2 and memory["tensorParallelSize"] == 2
        assert 16 * GiB < memory["weightsBytes"] < 20 * GiB and memory["kvBytesPerToken"] == 160 * 1024
        wait_until(lambda: [e for e in events_for(dev_cluster, namespace, NAME)
                            if e["reason"] == "MemoryDoesNotFit"], 15, "MemoryDoesNotFit event")
        assert list_kind(dev_cluster, namespace, "deployment", f"app.kubernetes.io/instance={NAME}") == []
        table = dev_cluster.kubectl("get", "llmd", NAME, "-n", namespace).stdout.splitlines()
        assert table[1].split()[-2] == "False"  # the FITS column
