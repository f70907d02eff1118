"""etcd of the dev cluster, as kubeadm sets it up: TLS, and only client certificates of etcd's own CA
(the API server's, the health probe's) get in — not plain HTTP, not a client without a certificate,
not even the cluster admin's certificate."""

from __future__ import annotations

import http.client
import json
import ssl

import pytest
from fleetserve_devcluster import pki
from fleetserve_devcluster.controlplane import ClusterConfig
from fleetserve_devcluster.testing import DevClusterHandle

ERRORS = (ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)


def _health(port: int, ctx: ssl.SSLContext | None) -> tuple[int, str]:
    conn: http.client.HTTPConnection
    if ctx is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_etcd_takes_only_its_own_cas_client_certificates(dev_cluster: DevClusterHandle) -> None:
    port = ClusterConfig.load(dev_cluster.state_dir).ports["etcd"]
    paths = pki.PKIPaths(dev_cluster.state_dir / "pki")

    def tls(identity: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(paths.crt(pki.ETCD_CA)))
        if identity:
            ctx.load_cert_chain(str(paths.crt(identity)), str(paths.key(identity)))
        return ctx

    with pytest.raises(ERRORS):
        _health(port, None)  # plain HTTP, as anyone on the machine could
    with pytest.raises(ERRORS):
        _health(port, tls(None))  # TLS without a client certificate
    with pytest.raises(ERRORS):
        _health(port, tls("admin"))  # the cluster CA's admin is not an etcd client
    status, body = _health(port, tls("apiserver-etcd-client"))
    assert status == 200 and json.loads(body)["health"] == "true"
