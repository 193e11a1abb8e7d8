#!/usr/bin/env bash
# `make run`: the whole system on this machine. Installs the locked environment, starts the
# local Kafka + FerretDB stack (or uses KAFKA_BOOTSTRAP_SERVERS / MONGODB_URL if set), starts
# the five services, waits until each is ready, prints where to look, and on Ctrl-C stops
# exactly what it started.
#
# Then the live demo: the simulator (python -m tools.simulator) plays a day in the background
# (log in the state dir) while the live view (python -m tools.live) shows queues, routing,
# overflow and KPIs. HOMETEAM_DEMO=0 skips both; HOMETEAM_DEMO_RATE (customer messages per
# second, default 2), HOMETEAM_DEMO_DURATION (seconds, default 3600) and HOMETEAM_DEMO_SEED
# (default 42) tune the simulator.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

STATE_DIR=${HOMETEAM_STATE_DIR:-$REPO_ROOT/.stack}
LOG_DIR=$STATE_DIR/logs
mkdir -p "$LOG_DIR"

bash scripts/bootstrap.sh

started_stack=0
embedded_store=0
if [[ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" || -z "${MONGODB_URL:-}" ]]; then
    bash scripts/stack.sh status >/dev/null 2>&1 || started_stack=1
    stack_env=$(bash scripts/stack.sh up)
    eval "$(printf '%s\n' "$stack_env" | sed 's/^/export /')"
    embedded_store=1
fi

# Local-only credentials for the webhooks, so the README's examples work against `make run`.
# Never use these anywhere else: set real secrets in the environment.
export TWILIO_AUTH_TOKEN=${TWILIO_AUTH_TOKEN:-local-twilio-auth-token}
export BUSINESS_CHAT_JWT_SECRET=${BUSINESS_CHAT_JWT_SECRET:-local-business-chat-secret-0123456789}
export APP_JWT_SECRET=${APP_JWT_SECRET:-local-app-secret-0123456789abcdef}
export PUBLIC_BASE_URL=${PUBLIC_BASE_URL:-http://127.0.0.1:8081}

declare -A PORTS=([ingest]=8081 [team_routing]=8082 [conversation_state]=8083 [timeout_sweeper]=8084 [metrics]=8085)
ORDER=(ingest team_routing conversation_state timeout_sweeper metrics)
PIDS=()
DEMO=${HOMETEAM_DEMO:-1}
SIM_PID=""
LIVE_PID=""

stop_demo() {
    # The live view first, then the simulator (it signs its agents off on the way out).
    local pid
    for pid in $LIVE_PID $SIM_PID; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $LIVE_PID $SIM_PID; do
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
}

stop_all() {
    trap - INT TERM HUP EXIT
    # Stop everything even if the terminal or a pipe reading our output is already gone.
    trap '' PIPE
    set +e
    stop_demo
    echo
    echo "run: stopping services" >&2
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if ((started_stack)); then
        bash scripts/stack.sh down >&2 || true
    fi
    echo "run: stopped" >&2
    exit 0
}
trap stop_all INT TERM HUP EXIT

# On the embedded FerretDB each service gets a database of its own (<MONGODB_DATABASE>_<service>;
# none reads another's collections): FerretDB 1.24 hangs for good once update statements in
# flight on one database pass 100 (docs/benchmarks.md, "Store settings"), which the five
# services together can reach under load, each alone cannot.
DATABASE=${MONGODB_DATABASE:-hometeam}
for svc in "${ORDER[@]}"; do
    db=$DATABASE
    if ((embedded_store)); then db=${DATABASE}_$svc; fi
    HTTP_PORT=${PORTS[$svc]} MONGODB_DATABASE=$db .venv/bin/python -m "services.$svc" >"$LOG_DIR/$svc.log" 2>&1 &
    PIDS+=("$!")
done

for svc in "${ORDER[@]}"; do
    port=${PORTS[$svc]}
    if ! .venv/bin/python scripts/wait_ready.py "http://127.0.0.1:$port/readyz" --timeout 90; then
        echo "run: $svc did not become ready; last lines of $LOG_DIR/$svc.log:" >&2
        tail -n 30 "$LOG_DIR/$svc.log" >&2
        exit 1
    fi
done

cat <<INFO

hometeam is running.
  ingest              http://127.0.0.1:8081  webhooks: /webhooks/sms /webhooks/business-chat /webhooks/app
  team-routing        http://127.0.0.1:8082
  conversation-state  http://127.0.0.1:8083  read API: /customers/{id}/conversation /conversations/{id} /teams/{team}/queue
  timeout-sweeper     http://127.0.0.1:8084
  metrics             http://127.0.0.1:8085  KPIs
  every service:      /healthz /readyz /metrics
  Kafka               $KAFKA_BOOTSTRAP_SERVERS   (topics: python -m shared.contracts.registry)
  store               $MONGODB_URL  $(if ((embedded_store)); then echo "databases ${DATABASE}_<service>"; else echo "database $DATABASE"; fi)
  logs                $LOG_DIR/
Press Ctrl-C to stop everything.
INFO

if [[ "$DEMO" == "0" ]]; then
    wait -n "${PIDS[@]}" || true
    echo "run: a service exited; see $LOG_DIR/" >&2
    exit 0  # the EXIT trap stops the rest
fi

SIM_LOG=$LOG_DIR/simulator.log
SIM_STATUS=$STATE_DIR/simulator.status.json
rm -f "$SIM_STATUS"
echo "run: live demo (HOMETEAM_DEMO=0 skips it); simulator log: $SIM_LOG"
.venv/bin/python -m tools.simulator \
    --seed "${HOMETEAM_DEMO_SEED:-42}" --rate "${HOMETEAM_DEMO_RATE:-2}" --duration "${HOMETEAM_DEMO_DURATION:-3600}" \
    --ingest-url "http://127.0.0.1:${PORTS[ingest]}" --bootstrap "$KAFKA_BOOTSTRAP_SERVERS" \
    --status-file "$SIM_STATUS" >"$SIM_LOG" 2>&1 &
SIM_PID=$!
# The view runs as a job of this script so that Ctrl-C reaches the trap at once (bash runs a
# trap only between commands, and `wait` is interruptible); it writes to this terminal.
.venv/bin/python -m tools.live \
    --metrics-url "http://127.0.0.1:${PORTS[metrics]}" --state-url "http://127.0.0.1:${PORTS[conversation_state]}" \
    --ingest-url "http://127.0.0.1:${PORTS[ingest]}" --bootstrap "$KAFKA_BOOTSTRAP_SERVERS" \
    --sim-status "$SIM_STATUS" --sim-log "$SIM_LOG" &
LIVE_PID=$!

wait -n "${PIDS[@]}" "$LIVE_PID" || true
if ! kill -0 "$LIVE_PID" 2>/dev/null; then
    echo "run: the live view exited; the services keep running (Ctrl-C stops everything)" >&2
    LIVE_PID=""
    wait -n "${PIDS[@]}" || true
fi
echo "run: a service exited; see $LOG_DIR/" >&2
