"""Generate the AsyncAPI documents of the five services with `faststream docs gen`, or check
that the committed ones (docs/asyncapi/) are up to date.

    python scripts/asyncapi.py write     # regenerate
    python scripts/asyncapi.py check     # exit 1 and show a diff if they drifted
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "asyncapi"
SERVICES = ("ingest", "team_routing", "conversation_state", "timeout_sweeper", "metrics")


def generate(service: str, out: Path) -> None:
    # A clean environment: the documents must not depend on who generates them.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
    env["PYTHONHASHSEED"] = "0"
    subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "faststream"),
            "docs",
            "gen",
            "--factory",
            f"services.{service}.app:asyncapi_app",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    # FastStream's order of channels and operations is not stable across runs: sort keys so
    # the committed document only changes when the contract does.
    out.write_text(json.dumps(json.loads(out.read_text()), indent=2, sort_keys=True) + "\n")


def drift() -> list[str]:
    """Unified diffs of every document that differs from a fresh generation."""
    diffs: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for service in SERVICES:
            fresh = Path(tmp) / f"{service}.json"
            generate(service, fresh)
            committed = DOCS / f"{service}.json"
            old = committed.read_text().splitlines() if committed.exists() else []
            new = fresh.read_text().splitlines()
            if old != new:
                diffs.append("\n".join(difflib.unified_diff(old, new, str(committed), "generated", lineterm="", n=2)))
    return diffs


def main(argv: list[str]) -> int:
    if argv[1:] == ["write"]:
        DOCS.mkdir(parents=True, exist_ok=True)
        for service in SERVICES:
            generate(service, DOCS / f"{service}.json")
            print(f"wrote {DOCS / service}.json")
        return 0
    if argv[1:] == ["check"]:
        diffs = drift()
        for d in diffs:
            print(d[:5000])
        return 1 if diffs else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
