"""`fleetserve operator --apply-crd`: which CRD it applies and when it leaves a newer one alone."""

from __future__ import annotations

import pytest
from fleetserve_operator.api.crd import build_crd
from fleetserve_operator.crdsync import VERSION_ANNOTATION, desired_crd, is_newer


@pytest.mark.parametrize(
    ("live", "ours", "newer"),
    [
        (None, "0.1.0", False),          # unmarked (installed by helm from crds/): apply
        ("0.1.0", "0.1.0", False),       # same release: apply (idempotent)
        ("0.1.0", "0.2.0", False),       # an upgrade
        ("0.2.0", "0.1.0", True),        # an older operator (rollback, old pod of a roll-out): leave it
        ("0.10.0", "0.9.1", True),       # numeric, not lexical
        ("v1.0", "0.9", True),
        ("garbage", "0.1.0", False),
        ("0.2.0", "dev", False),         # our version unknown: apply, as before this flag existed
    ],
)
def test_is_newer(live: str | None, ours: str, newer: bool) -> None:
    assert is_newer(live, ours) is newer


def test_desired_crd_is_the_generated_one_marked_with_the_version() -> None:
    crd = desired_crd("1.2.3")
    assert crd["metadata"]["annotations"] == {VERSION_ANNOTATION: "1.2.3"}
    plain = build_crd()
    assert crd["spec"] == plain["spec"] and crd["metadata"]["name"] == plain["metadata"]["name"]
