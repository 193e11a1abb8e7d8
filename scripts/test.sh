#!/usr/bin/env bash
# `make test`: install the locked environment, start the local Kafka + FerretDB stack (unless
# KAFKA_BOOTSTRAP_SERVERS and MONGODB_URL already point somewhere), run every test, and stop
# the stack again if this script started it. Extra arguments go to pytest.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

bash scripts/bootstrap.sh
bash scripts/tools.sh
bash scripts/prometheus_tools.sh >/dev/null

started_stack=0
if [[ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" || -z "${MONGODB_URL:-}" ]]; then
    if ! bash scripts/stack.sh status >/dev/null 2>&1; then
        started_stack=1
    fi
    stack_env=$(bash scripts/stack.sh up)
    eval "$(printf '%s\n' "$stack_env" | sed 's/^/export /')"
fi

cleanup() {
    if ((started_stack)); then
        bash scripts/stack.sh down >&2 || true
    fi
}
trap cleanup EXIT

export HOMETEAM_REQUIRE_INTEGRATION=1
.venv/bin/python -m pytest "$@"
