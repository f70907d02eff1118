"""Certificates and kubeconfigs of the dev cluster, made with the `openssl` CLI.

One CA signs the API server's serving certificate and every client
certificate (client identities are the certificate's CN = user and O =
groups, as in kubeadm); the controller-manager also uses it to sign CSRs.
A second CA is the front proxy's, for the aggregation layer.  The service
account signing key is a separate key pair.  EC P-256 keys keep generation
instant.  Nothing here talks to the network.

Invariant: `ensure_pki()` is idempotent — existing files are kept, so a
restarted API server keeps its identity and tokens stay valid.
"""

from __future__ import annotations

import base64
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

# The first address of the service CIDR is the `kubernetes` Service's cluster IP;
# it must be a SAN of the serving cert for in-cluster clients.
SERVICE_CIDR = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
CLUSTER_NAME = "fleetserve-dev"
ETCD_CA = "etcd-ca"

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
"""

# (file stem, subject, extendedKeyUsage); CN = user name, O = group.
CLIENT_IDENTITIES: dict[str, tuple[str, str]] = {
    "admin": ("/O=system:masters/CN=fleetserve-admin", "clientAuth"),
    "controller-manager": ("/CN=system:kube-controller-manager", "clientAuth"),
    "scheduler": ("/CN=system:kube-scheduler", "clientAuth"),
    # The API server's identity towards kubelets / aggregated API servers.
    "apiserver-kubelet-client": ("/O=kubeadm:cluster-admins/CN=kube-apiserver-kubelet-client", "clientAuth"),
}


class PKIError(RuntimeError):
    """openssl failed; the message carries its stderr."""


@dataclass(frozen=True)
class PKIPaths:
    """Where every file of the PKI lives under ``<state>/pki``."""

    root: Path

    def crt(self, stem: str) -> Path:
        return self.root / f"{stem}.crt"

    def key(self, stem: str) -> Path:
        return self.root / f"{stem}.key"

    @property
    def ca_crt(self) -> Path:
        return self.crt("ca")

    @property
    def ca_key(self) -> Path:
        return self.key("ca")

    @property
    def sa_key(self) -> Path:
        return self.root / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.root / "sa.pub"


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise PKIError("the `openssl` command is required to make the dev cluster's certificates; install openssl")
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PKIError(f"openssl {args[0]} failed ({proc.returncode}): {proc.stderr.strip()}")


def _new_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=path.parent)
    path.chmod(0o600)


def _new_ca(paths: PKIPaths, stem: str, cn: str) -> None:
    crt, key = paths.crt(stem), paths.key(stem)
    if crt.exists() and key.exists():
        return
    _new_key(key)
    cnf = paths.root / "openssl.cnf"
    cnf.write_text(_OPENSSL_CNF)
    _openssl("req", "-x509", "-new", "-sha256", "-key", str(key), "-subj", f"/CN={cn}", "-days", "3650",
             "-config", str(cnf), "-extensions", "v3_ca", "-out", str(crt), cwd=paths.root)


def _new_leaf(paths: PKIPaths, stem: str, subject: str, usage: str, sans: list[str] | None = None,
              ca: str = "ca") -> None:
    crt, key = paths.crt(stem), paths.key(stem)
    if crt.exists() and key.exists():
        return
    _new_key(key)
    cnf = paths.root / "openssl.cnf"
    cnf.write_text(_OPENSSL_CNF)
    ext = [
        "basicConstraints = critical, CA:FALSE",
        "keyUsage = critical, digitalSignature, keyEncipherment",
        f"extendedKeyUsage = {usage}",
        "subjectKeyIdentifier = hash",
        "authorityKeyIdentifier = keyid",
    ]
    if sans:
        ext.append("subjectAltName = " + ", ".join(sans))
    with tempfile.TemporaryDirectory() as tmp:
        csr, extfile = Path(tmp) / "req.csr", Path(tmp) / "ext.cnf"
        extfile.write_text("\n".join(ext) + "\n")
        _openssl("req", "-new", "-sha256", "-key", str(key), "-subj", subject, "-config", str(cnf),
                 "-out", str(csr), cwd=paths.root)
        _openssl("x509", "-req", "-sha256", "-in", str(csr), "-CA", str(paths.crt(ca)), "-CAkey", str(paths.key(ca)),
                 "-set_serial", "0x" + _random_serial(), "-days", "3650", "-extfile", str(extfile),
                 "-out", str(crt), cwd=paths.root)


def _random_serial() -> str:
    # Positive 127-bit serial: unique per certificate, as RFC 5280 asks.
    return "4" + secrets.token_hex(15)


def ensure_pki(root: Path, extra_ips: tuple[str, ...] = ()) -> PKIPaths:
    """Create (once) the CAs, the serving cert, the client certs and the service-account keys.

    `extra_ips`: more IP SANs of the API server's serving certificate (with real nodes, its own
    address and the `kubernetes` Service's ClusterIP in the real nodes' Service range)."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    paths = PKIPaths(root)
    _new_ca(paths, "ca", "fleetserve-dev-ca")
    _new_ca(paths, "front-proxy-ca", "fleetserve-dev-front-proxy-ca")
    sans = ["DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local", "IP:127.0.0.1", f"IP:{KUBERNETES_SERVICE_IP}",
            *(f"IP:{ip}" for ip in extra_ips)]
    _new_leaf(paths, "apiserver", "/CN=kube-apiserver", "serverAuth", sans)
    for stem, (subject, usage) in CLIENT_IDENTITIES.items():
        _new_leaf(paths, stem, subject, usage)
    _new_leaf(paths, "front-proxy-client", "/CN=front-proxy-client", "clientAuth", ca="front-proxy-ca")
    # etcd's own CA, as kubeadm sets it up: only holders of its client certificates (the API server,
    # the health probe) may talk to etcd; a certificate of the cluster CA (e.g. the admin's) may not.
    _new_ca(paths, ETCD_CA, "fleetserve-dev-etcd-ca")
    loopback = ["DNS:localhost", "IP:127.0.0.1"]
    _new_leaf(paths, "etcd-server", "/CN=fleetserve-dev-etcd", "serverAuth, clientAuth", loopback, ca=ETCD_CA)
    _new_leaf(paths, "etcd-peer", "/CN=fleetserve-dev-etcd", "serverAuth, clientAuth", loopback, ca=ETCD_CA)
    _new_leaf(paths, "apiserver-etcd-client", "/CN=kube-apiserver-etcd-client", "clientAuth", ca=ETCD_CA)
    _new_leaf(paths, "etcd-healthcheck-client", "/CN=kube-etcd-healthcheck-client", "clientAuth", ca=ETCD_CA)
    if not (paths.sa_key.exists() and paths.sa_pub.exists()):
        _new_key(paths.sa_key)
        _openssl("pkey", "-in", str(paths.sa_key), "-pubout", "-out", str(paths.sa_pub), cwd=root)
    return paths


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, paths: PKIPaths, identity: str) -> Path:
    """A self-contained kubeconfig (certs embedded) for client identity ``identity``."""
    user = f"{CLUSTER_NAME}-{identity}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CLUSTER_NAME, "cluster": {
            "server": server, "certificate-authority-data": _b64(paths.ca_crt)}}],
        "users": [{"name": user, "user": {
            "client-certificate-data": _b64(paths.crt(identity)),
            "client-key-data": _b64(paths.key(identity))}}],
        "contexts": [{"name": CLUSTER_NAME, "context": {"cluster": CLUSTER_NAME, "user": user}}],
        "current-context": CLUSTER_NAME,
        "preferences": {},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path
