"""Base model and cross-field rules shared by the spec and status models.

A :class:`Rule` is written once and enforced twice: as a CEL
``x-kubernetes-validations`` entry in the generated CRD (so the API server
rejects the object at admission) and as a Python check run by pydantic (so a
spec built in code, or read from a cluster whose CRD is older, fails with the
same message). The CEL text and the Python check must mean the same thing;
``tests/integration/test_operator_admission.py`` proves the CEL side against a
real API server and ``tests/unit/test_operator_api.py`` the Python side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class Rule:
    """One cross-field validation rule.

    ``cel`` sees the object the rule is attached to as ``self`` (camelCase
    names); ``check`` sees the pydantic model (snake_case attributes) and
    returns True when the object is valid. ``field`` is the camelCase field the
    message is about, reported by the API server as the error's path.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]
    field: str | None = None

    def to_crd(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"rule": self.cel, "message": self.message}
        if self.field:
            entry["fieldPath"] = f".{self.field}"
            entry["reason"] = "FieldValueInvalid"
        return entry


def _add_rules_to_schema(schema: dict[str, Any], cls: type[Any]) -> None:
    rules: tuple[Rule, ...] = getattr(cls, "RULES", ())
    if rules:
        schema["x-kubernetes-validations"] = [rule.to_crd() for rule in rules]


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields rejected.

    Subclasses list their cross-field rules in ``RULES``; they become CEL in
    the CRD and are checked in Python after field validation.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        json_schema_extra=_add_rules_to_schema,
    )

    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        for rule in self.RULES:
            if not rule.check(self):
                where = f"{rule.field}: " if rule.field else ""
                raise ValueError(f"{where}{rule.message}")
        return self

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict the API server stores (unset optionals omitted)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
