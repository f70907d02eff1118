"""Drift: where a live child differs from what the operator applied, in the fields it sets.

The reconcile compares the *desired* object (what server-side apply would send)
with the *live* one, field by field, for the fields the desired object sets:
fields other managers add (the API server's defaults, a ``kubectl rollout
restart`` annotation, another controller's labels) are no drift, a changed or
removed value of a field fleetserve sets is. Server-side apply as field manager
``fleetserve`` with ``force`` then puts back exactly those fields.

This costs reads the reconcile does anyway, and a write only when something
differs — applying every child on every reconcile would cost one PATCH per
child per event (see BENCHMARKS.md, "API calls per reconcile").

Lists of objects that all carry a ``name`` (containers, env, ports, volumes,
volume mounts) are matched by name, as server-side apply merges them; other
lists are compared element by element and must have the same length.
Resource quantities compare by value (``"1.5"`` is ``"1500m"``).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

_QUANTITY = re.compile(r"^([+-]?[0-9.]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUFFIX = {
    None: Fraction(1), "m": Fraction(1, 1000), "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9),
    "T": Fraction(10**12), "P": Fraction(10**15), "E": Fraction(10**18), "Ki": Fraction(2**10),
    "Mi": Fraction(2**20), "Gi": Fraction(2**30), "Ti": Fraction(2**40), "Pi": Fraction(2**50), "Ei": Fraction(2**60),
}
MAX_VALUE_CHARS = 60


def _quantity(value: str) -> Fraction | None:
    match = _QUANTITY.match(value)
    if not match:
        return None
    try:
        return Fraction(match.group(1)) * _SUFFIX[match.group(2)]
    except (ValueError, ZeroDivisionError):
        return None


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have and type(want) is type(have):
        return True
    if isinstance(want, str) and isinstance(have, str):
        a, b = _quantity(want), _quantity(have)
        return a is not None and a == b
    # JSON has one number type: 1 and 1.0 are the same value.
    if isinstance(want, int | float) and isinstance(have, int | float) and not isinstance(want, bool) \
            and not isinstance(have, bool):
        return float(want) == float(have)
    return False


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == []


def _by_name(items: list[Any]) -> dict[str, Any] | None:
    if items and all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items):
        return {i["name"]: i for i in items}
    return None


def differences(desired: Any, live: Any, path: str = "") -> list[str]:
    """Paths (``spec.template.spec.containers[server].image``) where ``live`` does not have
    the value ``desired`` sets. Empty: no drift."""
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return [] if _empty(desired) and _empty(live) else [path or "."]
        out: list[str] = []
        for key, want in desired.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in live:
                if not _empty(want):
                    out.append(sub)
                continue
            out.extend(differences(want, live[key], sub))
        return out
    if isinstance(desired, list):
        if not isinstance(live, list):
            return [] if _empty(desired) and _empty(live) else [path]
        want_named, have_named = _by_name(desired), _by_name(live)
        if want_named is not None and (have_named is not None or not live):
            have_named = have_named or {}
            out = []
            for name, want in want_named.items():
                sub = f"{path}[{name}]"
                if name not in have_named:
                    out.append(sub)
                else:
                    out.extend(differences(want, have_named[name], sub))
            return out
        if len(desired) != len(live):
            return [path]
        out = []
        for i, (want, have) in enumerate(zip(desired, live, strict=True)):
            out.extend(differences(want, have, f"{path}[{i}]"))
        return out
    return [] if _same_scalar(desired, live) else [path]


def lookup(obj: Any, path: str) -> Any:
    """The value at a path :func:`differences` returned (None when it is absent)."""
    for part in re.findall(r"[^.\[\]]+|\[[^\]]*\]", path):
        if part.startswith("["):
            key = part[1:-1]
            if not isinstance(obj, list):
                return None
            named = _by_name(obj)
            if named is not None and key in named:
                obj = named[key]
            elif key.isdigit() and int(key) < len(obj):
                obj = obj[int(key)]
            else:
                return None
        else:
            if not isinstance(obj, dict):
                return None
            obj = obj.get(part)
    return obj


def describe(desired: dict[str, Any], live: dict[str, Any], paths: list[str], limit: int = 3) -> str:
    """``"spec.x: 'other:1' -> 'img:0.1'; ..."`` for the first ``limit`` paths."""
    parts = [f"{p}: {_short(lookup(live, p))} -> {_short(lookup(desired, p))}" for p in paths[:limit]]
    if len(paths) > limit:
        parts.append(f"and {len(paths) - limit} more")
    return "; ".join(parts)


def _short(value: Any) -> str:
    text = "(absent)" if value is None else repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."
