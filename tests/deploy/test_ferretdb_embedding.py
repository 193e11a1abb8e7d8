"""The embedded FerretDB's own Go tests (``deploy/ferretdb/*_test.go``), run with the Go
toolchain the local stack builds it with. Without Go they are skipped, unless the run must
not skip (``HOMETEAM_REQUIRE_INTEGRATION=1``, as ``make test`` sets)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

FERRET_SRC = Path(__file__).resolve().parents[2] / "deploy" / "ferretdb"


def test_the_embedding_go_tests_pass() -> None:
    go = shutil.which("go")
    if go is None:
        if os.environ.get("HOMETEAM_REQUIRE_INTEGRATION") == "1":
            pytest.fail("no Go toolchain: deploy/ferretdb's tests cannot run")
        pytest.skip("no Go toolchain")
    done = subprocess.run([go, "test", "-count=1", "./..."], cwd=FERRET_SRC, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok" in done.stdout
