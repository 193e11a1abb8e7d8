"""The bench's load generator runs in a child process: if it dies (Ctrl-C signals the whole
process group; a crash), the run learns it at once instead of waiting for ever on the pipe
(it hung there after cleaning up, in asyncio's shutdown)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_generator_that_dies_ends_the_wait() -> None:
    # A spec the child cannot plan from: it raises and exits before saying it is ready. In a
    # process of its own, so that a wait that never ends fails this test, not the session.
    code = "import asyncio\nfrom bench.pipeline import run_generator\nasyncio.run(run_generator({}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "EOFError" in done.stderr
