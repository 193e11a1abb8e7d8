#!/usr/bin/env bash
# Installs hometeam's locked Python environment (.venv) with uv; installs uv itself from PyPI
# when it is missing. Safe to run again: a synced environment is left as it is.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UV_VERSION=0.13.9

command -v python3 >/dev/null || { echo "bootstrap: error: missing tool: python3 (3.11)" >&2; exit 1; }
if ! python3 -m uv --version >/dev/null 2>&1; then
    echo "bootstrap: installing uv $UV_VERSION from PyPI" >&2
    python3 -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" >&2
fi
cd "$REPO_ROOT"
python3 -m uv sync --frozen --quiet >&2
