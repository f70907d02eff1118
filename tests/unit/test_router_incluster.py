"""`fleetserve router --service` inside a pod authenticates with the pod's service-account token.

The kubernetes package's in-cluster loader keeps that token under the "BearerToken" key (a
kubeconfig's under "authorization"); the router sent no Authorization header in a pod, and the API
server answered its EndpointSlice list 403 as system:anonymous (found by
tests/e2e/test_router_scale_from_zero.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleetserve_router.discovery import KubeAPI
from kubernetes.config import incluster_config


def test_in_cluster_token_is_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("pod-token-123")
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot used here\n-----END CERTIFICATE-----\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "16443")
    api = KubeAPI()
    api.cfg.verify_ssl = False  # the placeholder CA is no certificate
    client = api.client()
    assert str(client.base_url) == "https://127.0.0.1:16443"
    assert client.headers["authorization"].lower() == "bearer pod-token-123"
