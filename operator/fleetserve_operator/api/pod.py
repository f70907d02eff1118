"""Pod settings of ``LLMDeployment.spec`` that production clusters need.

Pull secrets, a service account, environment (``HF_TOKEN`` from a Secret for
gated models), where the model cache lives, the roll-out strategy, and extra
pod metadata. They are rendered into the Deployment by
:mod:`fleetserve_operator.resources.server`; every rendering still passes the
*restricted* Pod Security profile, except ``modelCache.hostPath``, which no
profile but ``privileged`` admits (documented on the field).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema

from .base import ApiModel, Rule
from .quantity import Quantity

# Env vars the operator sets itself; a duplicate name would make the apply ambiguous.
RESERVED_ENV = ("FLEETSERVE_CACHE_DIR", "HF_HOME", "HOME", "POD_NAME", "POD_NAMESPACE", "FLEETSERVE_API_KEY")
# Pod labels the operator owns: the selector (immutable in a Deployment) and its own markers.
RESERVED_POD_LABELS = (
    "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by",
    "app.kubernetes.io/component",
)
# Annotation prefix the operator owns on the pod template (template and config hashes).
RESERVED_ANNOTATION_PREFIX = "fleetserve.io/"

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
INT_OR_PERCENT = re.compile(r"^[0-9]+%$")


def _int_or_percent(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be an integer or a percentage like '25%', got {value!r}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"must not be negative, got {value}")
    if isinstance(value, str) and not INT_OR_PERCENT.match(value):
        raise ValueError(f"must be an integer or a percentage like '25%', got {value!r}")
    return value


IntOrPercent = Annotated[
    int | str,
    BeforeValidator(_int_or_percent),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "pattern": INT_OR_PERCENT.pattern}),
]


def _is_zero(value: int | str) -> bool:
    return str(value) in ("0", "0%")


class LocalObjectReference(ApiModel):
    """An object in the LLMDeployment's namespace, by name."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="object name")


class EnvVar(ApiModel):
    """One environment variable of the server container (core/v1 EnvVar)."""

    RULES = (
        Rule("!(has(self.value) && has(self.valueFrom))",
             "env: set either value or valueFrom, not both",
             lambda e: e.value is None or e.value_from is None, field="valueFrom"),
    )

    name: str = Field(min_length=1, max_length=253, pattern=ENV_NAME, description="variable name")
    value: str | None = Field(None, max_length=32768, description="literal value")
    value_from: dict[str, Any] | None = Field(
        None, description="core/v1 EnvVarSource: secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef"
    )


class EnvFromRef(ApiModel):
    """A ConfigMap or Secret whose keys all become environment variables."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="object name")
    optional: bool | None = Field(None, description="start the pod even when the object does not exist")


class EnvFromSource(ApiModel):
    """core/v1 EnvFromSource: every key of one ConfigMap or Secret (e.g. HF_TOKEN from a Secret)."""

    RULES = (
        Rule("has(self.configMapRef) != has(self.secretRef)",
             "envFrom: each entry names exactly one of configMapRef or secretRef",
             lambda e: (e.config_map_ref is None) != (e.secret_ref is None)),
    )

    prefix: str | None = Field(None, max_length=253, pattern=ENV_NAME, description="prefix for every variable name")
    config_map_ref: EnvFromRef | None = Field(None, description="a ConfigMap in the namespace")
    secret_ref: EnvFromRef | None = Field(None, description="a Secret in the namespace")


class EmptyDirCache(ApiModel):
    """A per-pod cache: every new pod downloads/converts the model again."""

    size_limit: Quantity | None = Field(None, description="evict the pod when the cache grows past this, e.g. 50Gi")


class PersistentVolumeClaimCache(ApiModel):
    """An existing claim shared by the replicas (ReadWriteMany, or ReadWriteOnce on one node).

    The first pod fills it while the others wait on a lock file in it; later
    pods (and restarts) load what is there without downloading or converting.
    """

    claim_name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="PersistentVolumeClaim name")


class HostPathCache(ApiModel):
    """A directory on the node (e.g. kind-config.yaml's /var/cache/fleetserve mount).

    Only the ``privileged`` Pod Security profile admits hostPath volumes: a
    namespace enforcing ``baseline`` or ``restricted`` rejects these pods.
    """

    path: str = Field(min_length=2, max_length=4096, pattern=r"^/.+", description="absolute path on the node")
    type: Literal["Directory", "DirectoryOrCreate"] = Field(
        "DirectoryOrCreate", description="Directory: must exist; DirectoryOrCreate: created when missing"
    )


class ModelCache(ApiModel):
    """Where weights are downloaded and converted (mounted at /var/cache/fleetserve). At most one kind."""

    RULES = (
        Rule("(has(self.emptyDir) ? 1 : 0) + (has(self.persistentVolumeClaim) ? 1 : 0) + "
             "(has(self.hostPath) ? 1 : 0) <= 1",
             "modelCache: set at most one of emptyDir, persistentVolumeClaim or hostPath",
             lambda m: sum(x is not None for x in (m.empty_dir, m.persistent_volume_claim, m.host_path)) <= 1),
    )

    empty_dir: EmptyDirCache | None = Field(None, description="per-pod cache (the default)")
    persistent_volume_claim: PersistentVolumeClaimCache | None = Field(
        None, description="a claim shared by the replicas: one pod fills it, the others reuse it"
    )
    host_path: HostPathCache | None = Field(
        None, description="a node directory (needs a namespace with the privileged Pod Security profile)"
    )


class Strategy(ApiModel):
    """The Deployment's rolling update.

    The default (maxSurge 1, maxUnavailable 0) never drops below the wanted
    capacity but needs one free GPU for the extra pod; on a cluster with no
    spare GPU use maxSurge 0, maxUnavailable 1 (one replica down at a time).
    """

    RULES = (
        Rule("!(string(self.maxSurge) in ['0', '0%'] && string(self.maxUnavailable) in ['0', '0%'])",
             "strategy: maxSurge and maxUnavailable cannot both be 0 (the roll-out could never progress); "
             "use maxSurge 0, maxUnavailable 1 when no spare GPU exists",
             lambda s: not (_is_zero(s.max_surge) and _is_zero(s.max_unavailable)), field="maxUnavailable"),
    )

    max_surge: IntOrPercent = Field(1, description="extra pods during a roll-out (needs a free GPU each)")
    max_unavailable: IntOrPercent = Field(0, description="pods that may be down during a roll-out")


def pod_settings_rules() -> tuple[Rule, ...]:
    """Spec-level rules about the pod settings (they need the whole spec's names)."""
    labels = ", ".join(f"'{k}'" for k in RESERVED_POD_LABELS)
    env = ", ".join(f"'{k}'" for k in RESERVED_ENV)
    return (
        Rule(f"!has(self.podLabels) || self.podLabels.all(k, !(k in [{labels}]))",
             f"podLabels may not set {', '.join(RESERVED_POD_LABELS)}: the operator owns them "
             "(they select the pods)",
             lambda s: not set(s.pod_labels) & set(RESERVED_POD_LABELS), field="podLabels"),
        Rule(f"!has(self.podAnnotations) || self.podAnnotations.all(k, !k.startsWith('{RESERVED_ANNOTATION_PREFIX}'))",
             f"podAnnotations may not use the {RESERVED_ANNOTATION_PREFIX} prefix: the operator owns it",
             lambda s: not any(k.startswith(RESERVED_ANNOTATION_PREFIX) for k in s.pod_annotations),
             field="podAnnotations"),
        Rule(f"!has(self.env) || self.env.all(e, !(e.name in [{env}]))",
             f"env may not set {', '.join(RESERVED_ENV)}: the operator sets them",
             lambda s: not {e.name for e in s.env} & set(RESERVED_ENV), field="env"),
    )
