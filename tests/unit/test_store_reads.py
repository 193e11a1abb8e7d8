"""Which servers get batch reads as one ``$in`` and which one ``_id`` at a time."""

from __future__ import annotations

import pytest

from shared.runtime.store import needs_point_reads

FERRETDB_1_24 = {  # buildInfo of the embedded FerretDB 1.24.2 (trimmed)
    "version": "7.0.42",
    "versionArray": [7, 0, 42, 0],
    "ferretdbVersion": "unknown",
    "ferretdbFeatures": {"aggregationStages": ["$group", "$match"]},
    "ok": 1.0,
}
MONGODB_7 = {"version": "7.0.14", "gitVersion": "ce59cfc6a3c5e5c067dca0d30697edd68d4f5188", "versionArray": [7, 0, 14, 0], "ok": 1.0}
MONGODB_8 = {"version": "8.0.4", "versionArray": [8, 0, 4, 0], "modules": ["enterprise"], "ok": 1.0}


@pytest.mark.parametrize(
    ("build_info", "point_reads"),
    [
        (FERRETDB_1_24, True),
        ({"version": "7.0.42", "ferretdbVersion": "v1.24.2", "ok": 1.0}, True),
        (MONGODB_7, False),
        (MONGODB_8, False),
    ],
)
def test_only_ferretdb_gets_point_reads(build_info: dict, point_reads: bool) -> None:
    assert needs_point_reads(build_info) is point_reads
