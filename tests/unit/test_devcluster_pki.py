"""The dev cluster's PKI: identities, SANs, chains, idempotence, kubeconfig."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
import yaml
from fleetserve_devcluster import pki


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> pki.PKIPaths:
    return pki.ensure_pki(tmp_path_factory.mktemp("pki") / "pki")


def openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=True).stdout


def test_every_certificate_chains_to_its_ca(paths: pki.PKIPaths) -> None:
    for stem in ["apiserver", *pki.CLIENT_IDENTITIES]:
        assert openssl("verify", "-CAfile", str(paths.ca_crt), str(paths.crt(stem))).strip().endswith("OK")
    front = openssl("verify", "-CAfile", str(paths.crt("front-proxy-ca")), str(paths.crt("front-proxy-client")))
    assert front.strip().endswith("OK")
    with pytest.raises(subprocess.CalledProcessError):  # and not to the other CA
        openssl("verify", "-CAfile", str(paths.ca_crt), str(paths.crt("front-proxy-client")))


def test_serving_cert_covers_loopback_and_the_kubernetes_service(paths: pki.PKIPaths) -> None:
    text = openssl("x509", "-in", str(paths.crt("apiserver")), "-noout", "-ext", "subjectAltName,extendedKeyUsage")
    for san in ("IP Address:127.0.0.1", f"IP Address:{pki.KUBERNETES_SERVICE_IP}", "DNS:kubernetes.default.svc",
                "DNS:localhost", "TLS Web Server Authentication"):
        assert san in text


def test_admin_is_in_system_masters(paths: pki.PKIPaths) -> None:
    subject = openssl("x509", "-in", str(paths.crt("admin")), "-noout", "-subject", "-nameopt", "RFC2253")
    assert "O=system:masters" in subject and "CN=fleetserve-admin" in subject
    usage = openssl("x509", "-in", str(paths.crt("admin")), "-noout", "-ext", "extendedKeyUsage")
    assert "TLS Web Client Authentication" in usage


def test_private_keys_are_private_and_sa_keys_match(paths: pki.PKIPaths) -> None:
    for key in paths.root.glob("*.key"):
        assert key.stat().st_mode & 0o077 == 0, key
    derived = openssl("pkey", "-in", str(paths.sa_key), "-pubout")
    assert derived == paths.sa_pub.read_text()


def test_ensure_pki_is_idempotent(paths: pki.PKIPaths) -> None:
    before = {p.name: p.read_bytes() for p in paths.root.iterdir()}
    pki.ensure_pki(paths.root)
    after = {p.name: p.read_bytes() for p in paths.root.iterdir()}
    assert before == after


def test_kubeconfig_embeds_ca_and_identity(paths: pki.PKIPaths, tmp_path: Path) -> None:
    kc = pki.write_kubeconfig(tmp_path / "kubeconfig", "https://127.0.0.1:16443", paths, "scheduler")
    config = yaml.safe_load(kc.read_text())
    cluster = config["clusters"][0]["cluster"]
    assert cluster["server"] == "https://127.0.0.1:16443"
    assert base64.b64decode(cluster["certificate-authority-data"]) == paths.ca_crt.read_bytes()
    user = config["users"][0]["user"]
    assert base64.b64decode(user["client-certificate-data"]) == paths.crt("scheduler").read_bytes()
    assert config["current-context"] == pki.CLUSTER_NAME
    assert kc.stat().st_mode & 0o077 == 0
