"""A small synchronous Kubernetes client for the handful of kinds the operator touches.

Built on the official client's ``ApiClient`` (authentication, TLS, kubeconfig
or in-cluster config) but speaking plain dicts, so that server-side apply,
merge patches of ``/status`` and generic kinds (ServiceMonitor) all go
through one path. Every call names its verb; the list in ``handlers.py``'s
docstring (and the Helm chart's RBAC) follows from these methods.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from .resources.labels import FIELD_MANAGER

# kind -> (apiVersion, plural)
KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("v1", "configmaps"),
    "Service": ("v1", "services"),
    "Pod": ("v1", "pods"),
    "Event": ("v1", "events"),
    "Deployment": ("apps/v1", "deployments"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
    "ServiceAccount": ("v1", "serviceaccounts"),
    "Role": ("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings"),
    "ServiceMonitor": ("monitoring.coreos.com/v1", "servicemonitors"),
    "PrometheusRule": ("monitoring.coreos.com/v1", "prometheusrules"),
    "LLMDeployment": ("fleetserve.io/v1alpha1", "llmdeployments"),
}


class KubeError(Exception):
    """A non-2xx answer from the API server (``status`` is the HTTP code)."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}".strip())
        self.status = status
        self.message = message
        self.reason = reason

    @property
    def retriable(self) -> bool:
        """Conflicts, throttling and server-side trouble pass; the rest needs a different request."""
        return self.status in (409, 429) or self.status >= 500 or self.status == 0


def load_configuration() -> Any:
    """A ``kubernetes.client.Configuration`` from the service account or ``$KUBECONFIG`` *as it is now*.

    (The client library reads ``$KUBECONFIG`` once, at import; tests and the
    CLI set it later, so the path is passed explicitly.)
    """
    import os

    from kubernetes import client, config

    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        config.load_kube_config(config_file=path, client_configuration=configuration)
    # Reconciles run in kopf's thread pool and read children in parallel: keep their connections.
    configuration.connection_pool_maxsize = 32
    return configuration


def resource_path(api_version: str, plural: str, namespace: str | None, name: str | None = None,
                  subresource: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = base + (f"/namespaces/{quote(namespace)}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


class Kube:
    """Thin dict-in, dict-out wrapper; thread-safe like the underlying urllib3 pool."""

    def __init__(self, api_client: Any, timeout_seconds: float = 30.0) -> None:
        self.api = api_client
        self.timeout = timeout_seconds

    @classmethod
    def from_environment(cls) -> Kube:
        """In-cluster credentials when running in a pod, else ``$KUBECONFIG`` / ``~/.kube/config``."""
        from kubernetes import client

        return cls(client.ApiClient(load_configuration()))

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        from kubernetes.client.exceptions import ApiException

        try:
            serialized = self.api.param_serialize(
                method, path, query_params=query or [], header_params=headers, body=body,
                auth_settings=["BearerToken"],
            )
            response = self.api.call_api(*serialized, _request_timeout=self.timeout)
            data = response.read()
        except ApiException as exc:
            raise KubeError(int(exc.status or 0), str(exc.body or exc.reason), str(exc.reason or "")) from None
        except OSError as exc:  # connection refused, TLS trouble: the API server is away
            raise KubeError(0, str(exc), "Unreachable") from None
        except Exception as exc:  # urllib3 wraps socket errors in its own exception types
            if type(exc).__module__.startswith("urllib3"):
                raise KubeError(0, str(exc), "Unreachable") from None
            raise
        if not 200 <= response.status < 300:
            try:  # a Status object, usually; plain text ("404 page not found") for unknown paths
                status = json.loads(data)
            except ValueError:
                status = {"message": data.decode(errors="replace").strip() if isinstance(data, bytes) else str(data)}
            raise KubeError(response.status, str(status.get("message", "")), str(status.get("reason", "")))
        payload: dict[str, Any] = json.loads(data) if data else {}
        return payload

    # --- reads -------------------------------------------------------------------

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """verb: get. None when it does not exist."""
        api_version, plural = KINDS[kind]
        try:
            return self.request("GET", resource_path(api_version, plural, namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str | None, label_selector: str | None = None) -> list[dict[str, Any]]:
        """verb: list."""
        api_version, plural = KINDS[kind]
        query = [("labelSelector", label_selector)] if label_selector else []
        return list(self.request("GET", resource_path(api_version, plural, namespace), query=query)["items"])

    def served_kinds(self, group_version: str) -> frozenset[str]:
        """Kinds an API group/version serves (discovery); empty when the group is not installed."""
        try:
            listing = self.request("GET", f"/apis/{group_version}")
        except KubeError as exc:
            if exc.status in (404, 503):
                return frozenset()
            raise
        return frozenset(r["kind"] for r in listing.get("resources", []) if "/" not in r.get("name", ""))

    # --- writes ------------------------------------------------------------------

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """verb: patch (server-side apply as field manager ``fleetserve``; creates when absent)."""
        api_version, plural = KINDS[obj["kind"]]
        meta = obj["metadata"]
        return self.request(
            "PATCH", resource_path(api_version, plural, meta.get("namespace"), meta["name"]),
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            body=obj, content_type="application/apply-patch+yaml",
        )

    def delete(self, obj: dict[str, Any]) -> None:
        """verb: delete, only the exact object observed (uid precondition)."""
        api_version, plural = KINDS[obj["kind"]]
        meta = obj["metadata"]
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background",
                "preconditions": {"uid": meta["uid"]}}
        try:
            self.request("DELETE", resource_path(api_version, plural, meta.get("namespace"), meta["name"]),
                         body=body, content_type="application/json")
        except KubeError as exc:
            if exc.status not in (404, 409):  # already gone, or replaced by a newer object
                raise

    def patch_status(self, kind: str, namespace: str, name: str, patch: dict[str, Any],
                     resource_version: str | None = None) -> dict[str, Any]:
        """verb: patch on the status subresource (JSON merge patch of the changed keys only).

        With ``resource_version`` the write fails with 409 if the object moved on
        since it was read, so a stale computation never overwrites a newer one.
        """
        api_version, plural = KINDS[kind]
        body: dict[str, Any] = {"status": patch}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return self.request("PATCH", resource_path(api_version, plural, namespace, name, "status"),
                            body=body, content_type="application/merge-patch+json")

    def post_event(self, involved: dict[str, Any], type_: str, reason: str, message: str,
                   component: str = "fleetserve-operator") -> None:
        """verb: create on core/v1 events, attached to ``involved`` (shown by `kubectl describe`)."""
        meta = involved["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
                "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.request("POST", resource_path("v1", "events", meta["namespace"]), body=event,
                     content_type="application/json")
