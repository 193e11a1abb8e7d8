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

# shellcheck source=lib/use_stack.sh
source scripts/lib/use_stack.sh

export HOMETEAM_REQUIRE_INTEGRATION=1
.venv/bin/python -m pytest "$@"
