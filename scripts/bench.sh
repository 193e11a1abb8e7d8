#!/usr/bin/env bash
# `make bench`: the benchmarks, on the local Kafka + FerretDB stack (or on KAFKA_BOOTSTRAP_SERVERS
# and MONGODB_URL when both are set). Installs the locked environment, starts the stack unless
# it already runs (and stops it afterwards only if this script started it), then runs
#   1. the routing-decision micro-benchmark (python -m bench.routing_decision), first: a
#      single-process micro-benchmark wants a quiet machine, and after the sweep the stack is
#      still busy for a while (it measured 82,000-98,000/s there instead of 120,000),
#   2. the pipeline benchmark with its defaults (python -m bench.pipeline: open-loop sweep of
#      arrival rates through the five services, the raw Kafka pass-through baseline in the same
#      run, JSON + PNG in bench-results/),
#   3. the skeleton: the pipeline's Kafka traffic alone, five bare processes moving records in
#      the shape step 2 measured at its highest bounded rate, bytes as they are and then each
#      record parsed (python -m bench.skeleton): the ceiling of the ratio pipeline / baseline,
#   4. the timeout-sweeper benchmark (python -m bench.sweeper),
#   5. the store's cost per operation (python -m bench.store_ops).
# The memory benchmark with a million known customers is separate: python -m bench.memory.
# Extra arguments go to bench.pipeline (e.g. scripts/bench.sh --rates 100,200 --duration 10).
# See docs/benchmarks.md for what each number means.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

bash scripts/bootstrap.sh

# shellcheck source=lib/use_stack.sh
source scripts/lib/use_stack.sh

started=$(date +%s)
echo "bench: machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "== 1/5 routing decision micro-benchmark (python -m bench.routing_decision)"
.venv/bin/python -m bench.routing_decision
echo
echo "== 2/5 pipeline: open-loop sweep and raw Kafka pass-through baseline (python -m bench.pipeline)"
# (a failure, e.g. exit status 3: the message path lost, doubled or reordered a message, does
# not stop the other benchmarks; this script exits with the pipeline's status at the end)
pipeline_status=0
mkdir -p bench-results
marker=$(mktemp)  # (no trap of its own: use_stack.sh's EXIT trap stops the stack)
.venv/bin/python -m bench.pipeline --out bench-results "$@" || pipeline_status=$?
[ "$pipeline_status" -eq 130 ] && exit 130  # interrupted
echo
echo "== 3/5 skeleton: the pipeline's Kafka traffic with no service work (python -m bench.skeleton)"
# (in the shape this run's pipeline step at its highest bounded rate measured, if it wrote a result)
pipeline_result=$(find bench-results -maxdepth 1 -name '*.json' -newer "$marker" | sort | tail -n 1)
rm -f "$marker"
.venv/bin/python -m bench.skeleton ${pipeline_result:+--shape-from "$pipeline_result"} || echo "bench: the skeleton did not complete (exit status $?)"
echo
echo "== 4/5 timeout-sweeper: due deadlines per minute (python -m bench.sweeper)"
.venv/bin/python -m bench.sweeper
echo
echo "== 5/5 store: cost per operation (python -m bench.store_ops)"
.venv/bin/python -m bench.store_ops
echo
echo "bench: done in $(($(date +%s) - started)) s; load average now $(cut -d' ' -f1-3 /proc/loadavg)"
echo "bench: results and plot in $REPO_ROOT/bench-results/ (newest: $(ls -t bench-results/*.json 2>/dev/null | head -1))"
if [ "$pipeline_status" -ne 0 ]; then
  echo "bench: the pipeline benchmark failed (exit status $pipeline_status; 3: a MESSAGE PATH FAULT line above)" >&2
  exit "$pipeline_status"
fi
