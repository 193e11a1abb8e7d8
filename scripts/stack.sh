#!/usr/bin/env bash
# Local hometeam stack without a Docker engine: a single-node Apache Kafka (KRaft, jars from
# Maven Central) and FerretDB 1.24 on SQLite (an embedding Go module), both on 127.0.0.1.
#
#   scripts/stack.sh up             check tools, start Kafka + FerretDB, create topics, print env
#   scripts/stack.sh down [--purge] stop what `up` started (by pid); --purge also deletes data
#   scripts/stack.sh status         show what runs; exit 0 if both servers run, 1 otherwise
#   scripts/stack.sh topics         create missing topics / grow partitions (idempotent)
#   scripts/stack.sh env [--export] print KAFKA_BOOTSTRAP_SERVERS and MONGODB_URL lines
#
# Use the servers from a shell:   eval "$(scripts/stack.sh env --export)"
#
# Settings (environment): HOMETEAM_STATE_DIR (default <repo>/.stack), HOMETEAM_KAFKA_PORT
# (19092), HOMETEAM_KAFKA_CONTROLLER_PORT (19093), HOMETEAM_MONGO_PORT (27027),
# HOMETEAM_PYTHON (<repo>/.venv/bin/python), HOMETEAM_KAFKA_HEAP_OPTS (-Xms256m -Xmx768m),
# HOMETEAM_KAFKA_START_TIMEOUT (120 s), HOMETEAM_MONGO_START_TIMEOUT (60 s), HOMETEAM_STOP_TIMEOUT
# (30 s before SIGKILL), HOMETEAM_FERRET_DEBUG_ADDR (unset; host:port to serve FerretDB's Go
# pprof profiles, for profiling the store under `make bench`), HOMETEAM_FERRET_ARGS (unset; extra
# flags for deploy/ferretdb, e.g. "-sqlite-wal-autocheckpoint 1000" to compare SQLite settings).
#
# Progress goes to stderr; only the env lines go to stdout. Processes are only ever stopped by
# the pids this script recorded, after checking /proc/<pid>/cmdline is what it started.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

STATE_DIR=${HOMETEAM_STATE_DIR:-$REPO_ROOT/.stack}
case $STATE_DIR in /*) ;; *) STATE_DIR=$PWD/$STATE_DIR ;; esac

KAFKA_PORT=${HOMETEAM_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${HOMETEAM_KAFKA_CONTROLLER_PORT:-19093}
MONGO_PORT=${HOMETEAM_MONGO_PORT:-27027}
PY=${HOMETEAM_PYTHON:-$REPO_ROOT/.venv/bin/python}
KAFKA_HEAP_OPTS=${HOMETEAM_KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}
KAFKA_START_TIMEOUT=${HOMETEAM_KAFKA_START_TIMEOUT:-120}
MONGO_START_TIMEOUT=${HOMETEAM_MONGO_START_TIMEOUT:-60}
STOP_TIMEOUT=${HOMETEAM_STOP_TIMEOUT:-30}

KAFKA_SRC=$REPO_ROOT/deploy/kafka
FERRET_SRC=$REPO_ROOT/deploy/ferretdb

CACHE_DIR=$STATE_DIR/cache
KAFKA_LIB=$CACHE_DIR/kafka-lib
KAFKA_LIB_STAMP=$CACHE_DIR/kafka-lib.sha256
BIN_DIR=$STATE_DIR/bin
FERRET_BIN=$BIN_DIR/ferretdb-embedded
FERRET_BIN_STAMP=$BIN_DIR/ferretdb-embedded.sha256
KAFKA_DIR=$STATE_DIR/kafka
KAFKA_DATA=$KAFKA_DIR/data
KAFKA_PROPS=$KAFKA_DIR/server.properties
KAFKA_FORMAT_STAMP=$KAFKA_DIR/formatted-controller-port
FERRET_DATA=$STATE_DIR/ferretdb/data
LOG_DIR=$STATE_DIR/logs
KAFKA_LOG=$LOG_DIR/kafka.log
FERRET_LOG=$LOG_DIR/ferretdb.log
PID_DIR=$STATE_DIR/pids

for _port_var in KAFKA_PORT KAFKA_CONTROLLER_PORT MONGO_PORT; do
    if ! [[ ${!_port_var} =~ ^[0-9]+$ ]] || ((${!_port_var} < 1 || ${!_port_var} > 65535)); then
        printf 'stack: error: HOMETEAM_%s=%s is not a TCP port\n' "$_port_var" "${!_port_var}" >&2
        exit 1
    fi
done
unset _port_var
if ((KAFKA_PORT == KAFKA_CONTROLLER_PORT || KAFKA_PORT == MONGO_PORT || KAFKA_CONTROLLER_PORT == MONGO_PORT)); then
    printf 'stack: error: the Kafka, Kafka controller and FerretDB ports must differ\n' >&2
    exit 1
fi

KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT
MONGODB_URL="mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true&retryWrites=false"

log() { printf 'stack: %s\n' "$*" >&2; }
die() {
    printf 'stack: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2
    exit 2
}

# ----------------------------------------------------------------------------- tools

java_cmd() {
    if [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
        printf '%s\n' "$JAVA_HOME/bin/java"
    else
        command -v java || true
    fi
}

check_python() {
    [[ -x $PY ]] || die "python not found at $PY: run 'uv sync' in $REPO_ROOT (or set HOMETEAM_PYTHON)"
}

check_tools() {
    local missing=() java version major
    java=$(java_cmd)
    if [[ -z $java ]]; then
        missing+=("java (Java 17+ is needed for Kafka 4.x; install e.g. openjdk-17-jre-headless)")
    else
        version=$("$java" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n1)
        major=${version%%[.+-]*}
        [[ $major == 1 ]] && major=$(cut -d. -f2 <<<"$version")
        if ! [[ $major =~ ^[0-9]+$ ]] || ((major < 17)); then
            missing+=("java 17+ (found '$java' version '${version:-unknown}')")
        fi
    fi
    command -v mvn >/dev/null 2>&1 || missing+=("mvn (Apache Maven, resolves the Kafka jars from Maven Central)")
    command -v go >/dev/null 2>&1 || missing+=("go (the Go toolchain, builds deploy/ferretdb)")
    if ((${#missing[@]})); then
        printf 'stack: error: missing tool: %s\n' "${missing[@]}" >&2
        exit 1
    fi
    check_python
}

probe() {
    (cd "$REPO_ROOT" && PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" \
        "$PY" "$REPO_ROOT/scripts/stack_probe.py" "$@")
}

# ----------------------------------------------------------------------------- processes

# Print the pid recorded for $1 (kafka|ferretdb) if that process is alive and its cmdline is
# the one this script starts; otherwise return 1.
running_pid() {
    local name=$1 pidfile=$PID_DIR/$1.pid pid cmd state
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/cmdline ]] || return 1
    state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ $state == Z || $state == X || -z $state ]] && return 1
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    case $name in
    kafka) [[ $cmd == *" kafka.Kafka $KAFKA_PROPS "* ]] || return 1 ;;
    ferretdb) [[ $cmd == "$FERRET_BIN "* && $cmd == *" -data-dir $FERRET_DATA "* ]] || return 1 ;;
    *) return 1 ;;
    esac
    printf '%s\n' "$pid"
}

# Remove a pid file whose process is gone or is not ours (pid reused): never signal it.
clear_stale_pid() {
    local name=$1
    if [[ -f $PID_DIR/$name.pid ]] && ! running_pid "$name" >/dev/null; then
        log "$name: removing stale pid file (pid $(<"$PID_DIR/$name.pid") is not our $name)"
        rm -f "$PID_DIR/$name.pid"
    fi
}

require_port_free() {
    local port=$1 what=$2 var=$3
    if ! probe port-free --port "$port"; then
        die "port $port ($what) on 127.0.0.1 is already in use by a process this stack did not start; stop it or set $var"
    fi
}

# Start "$@" in a new session, detached from this script, output appended to log $1.
launch() {
    local logfile=$1
    shift
    # 9>&- : do not leak the lock descriptor into the server (it would hold the lock forever).
    setsid nohup "$@" >>"$logfile" 2>&1 </dev/null 9>&- &
    LAUNCHED_PID=$!
}

# Byte size of a log file: where this run's output starts (we append across runs).
log_offset() { stat -c %s "$1" 2>/dev/null || echo 0; }

# The last 40 lines a server wrote to its log since byte offset $2.
tail_since() {
    tail -c +"$(($2 + 1))" "$1" 2>/dev/null | tail -n 40 >&2 || true
}

startup_failed() {
    local name=$1 logfile=$2 offset=$3 pid=${4:-}
    printf 'stack: error: %s failed to start; last 40 lines of %s:\n' "$name" "$logfile" >&2
    tail_since "$logfile" "$offset"
    if [[ -n $pid ]] && running_pid "$name" >/dev/null; then
        log "$name: stopping the half-started process (pid $pid)"
        stop_pids "$name"
    fi
    rm -f "$PID_DIR/$name.pid"
    exit 1
}

now_ms() {
    local t=${EPOCHREALTIME//[.,]/}
    printf '%s\n' "$((t / 1000))"
}

# SIGTERM each named server we started, wait up to STOP_TIMEOUT s, then SIGKILL.
stop_pids() {
    local name pid deadline kill_deadline
    local -A pids=()
    for name in "$@"; do
        if pid=$(running_pid "$name"); then
            log "$name: stopping pid $pid (SIGTERM)"
            kill -TERM "$pid" 2>/dev/null || true
            pids[$name]=$pid
        else
            clear_stale_pid "$name"
            log "$name: not running"
        fi
    done
    deadline=$(($(now_ms) + STOP_TIMEOUT * 1000))
    for name in "${!pids[@]}"; do
        pid=${pids[$name]}
        while running_pid "$name" >/dev/null && (($(now_ms) < deadline)); do
            sleep 0.2
        done
        if running_pid "$name" >/dev/null; then
            log "$name: still running after ${STOP_TIMEOUT}s, sending SIGKILL to pid $pid"
            kill -KILL "$pid" 2>/dev/null || true
            kill_deadline=$(($(now_ms) + 10000))
            while running_pid "$name" >/dev/null && (($(now_ms) < kill_deadline)); do sleep 0.1; done
        fi
        # Reap it if it is our own child (only during a failed start-up).
        wait "$pid" 2>/dev/null || true
        rm -f "$PID_DIR/$name.pid"
        log "$name: stopped"
    done
}

# ----------------------------------------------------------------------------- caches

sha_of() { sha256sum "$@" | cut -d' ' -f1; }

ensure_kafka_lib() {
    local want have="" tmp
    want=$(sha_of "$KAFKA_SRC/pom.xml")
    [[ -f $KAFKA_LIB_STAMP ]] && have=$(<"$KAFKA_LIB_STAMP")
    if [[ $have == "$want" ]] && compgen -G "$KAFKA_LIB/kafka_2.13-*.jar" >/dev/null; then
        log "kafka: jars cached in $KAFKA_LIB"
        return
    fi
    if running_pid kafka >/dev/null; then
        log "kafka: WARNING deploy/kafka/pom.xml changed but Kafka runs with the old jars;" \
            "run 'scripts/stack.sh down' then 'up' to switch"
        return
    fi
    log "kafka: resolving jars with Maven (deploy/kafka/pom.xml) into $KAFKA_LIB"
    mkdir -p "$CACHE_DIR"
    tmp=$(mktemp -d "$CACHE_DIR/kafka-lib.tmp.XXXXXX")
    if ! mvn -q -B -f "$KAFKA_SRC/pom.xml" dependency:copy-dependencies \
        -Dkafka.lib.dir="$tmp" >"$LOG_DIR/mvn.log" 2>&1; then
        tail -n 40 "$LOG_DIR/mvn.log" >&2 || true
        rm -rf "$tmp"
        die "mvn failed to resolve the Kafka jars (full output: $LOG_DIR/mvn.log)"
    fi
    compgen -G "$tmp/kafka_2.13-*.jar" >/dev/null || {
        rm -rf "$tmp"
        die "mvn ran but no kafka_2.13 jar appeared in $tmp"
    }
    rm -rf "$KAFKA_LIB"
    chmod 755 "$tmp"
    mv "$tmp" "$KAFKA_LIB"
    printf '%s\n' "$want" >"$KAFKA_LIB_STAMP"
    log "kafka: $(find "$KAFKA_LIB" -name '*.jar' | wc -l) jars resolved"
}

ferret_sources_sha() {
    (cd "$FERRET_SRC" && sha256sum go.mod go.sum ./*.go) | sha_of -
}

ensure_ferret_bin() {
    local want have="" tmp
    want=$(ferret_sources_sha)
    [[ -f $FERRET_BIN_STAMP ]] && have=$(<"$FERRET_BIN_STAMP")
    if [[ $have == "$want" && -x $FERRET_BIN ]]; then
        log "ferretdb: binary cached at $FERRET_BIN"
        return
    fi
    log "ferretdb: building deploy/ferretdb into $FERRET_BIN (first build downloads modules)"
    mkdir -p "$BIN_DIR"
    tmp=$(mktemp "$BIN_DIR/ferretdb-embedded.tmp.XXXXXX")
    if ! (cd "$FERRET_SRC" && go build -o "$tmp" .) >"$LOG_DIR/go-build.log" 2>&1; then
        tail -n 40 "$LOG_DIR/go-build.log" >&2 || true
        rm -f "$tmp"
        die "go build of deploy/ferretdb failed (full output: $LOG_DIR/go-build.log)"
    fi
    # Renaming keeps a running server on its old inode; it picks the new binary on restart.
    mv -f "$tmp" "$FERRET_BIN"
    printf '%s\n' "$want" >"$FERRET_BIN_STAMP"
    if running_pid ferretdb >/dev/null; then
        log "ferretdb: WARNING rebuilt, but the running server uses the old binary;" \
            "run 'scripts/stack.sh down' then 'up' to switch"
    fi
}

# ----------------------------------------------------------------------------- kafka

write_kafka_props() {
    local content
    content=$(<"$KAFKA_SRC/server.properties.template")
    # Quoted replacements: no pattern or '&' expansion of the values.
    content=${content//@KAFKA_PORT@/"$KAFKA_PORT"}
    content=${content//@KAFKA_CONTROLLER_PORT@/"$KAFKA_CONTROLLER_PORT"}
    content=${content//@KAFKA_DATA_DIR@/"$KAFKA_DATA"}
    if [[ $content == *@KAFKA_*@* ]]; then
        die "unsubstituted placeholder left in $KAFKA_SRC/server.properties.template"
    fi
    printf '# Generated by scripts/stack.sh from deploy/kafka/server.properties.template.\n%s\n' \
        "$content" >"$KAFKA_PROPS.tmp"
    mv -f "$KAFKA_PROPS.tmp" "$KAFKA_PROPS"
}

kafka_java() {
    local java
    java=$(java_cmd)
    # shellcheck disable=SC2086 # KAFKA_HEAP_OPTS is a list of JVM options
    printf '%s\0' "$java" $KAFKA_HEAP_OPTS -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
        -Djava.awt.headless=true \
        "-Dlog4j2.configurationFile=$KAFKA_SRC/log4j2.properties" \
        -cp "$KAFKA_LIB/*"
}

format_kafka() {
    local cid have_port
    if [[ -f $KAFKA_DATA/meta.properties ]]; then
        have_port=$(cat "$KAFKA_FORMAT_STAMP" 2>/dev/null || true)
        if [[ -n $have_port && $have_port != "$KAFKA_CONTROLLER_PORT" ]]; then
            die "kafka: $KAFKA_DATA was formatted for controller port $have_port, not" \
                "$KAFKA_CONTROLLER_PORT; use the old port or 'scripts/stack.sh down --purge'"
        fi
        log "kafka: log dir already formatted ($KAFKA_DATA)"
        return
    fi
    mkdir -p "$KAFKA_DATA"
    cid=$(probe cluster-id)
    log "kafka: formatting $KAFKA_DATA (cluster id $cid, --standalone)"
    local -a java_args
    mapfile -d '' java_args < <(kafka_java)
    local offset
    offset=$(log_offset "$KAFKA_LOG")
    printf '\n===== %s stack.sh: kafka StorageTool format =====\n' "$(date -Is)" >>"$KAFKA_LOG"
    if ! "${java_args[@]}" kafka.tools.StorageTool format --standalone -t "$cid" \
        -c "$KAFKA_PROPS" >>"$KAFKA_LOG" 2>&1 9>&-; then
        printf 'stack: error: formatting the Kafka log dir failed; last 40 lines of %s:\n' "$KAFKA_LOG" >&2
        tail_since "$KAFKA_LOG" "$offset"
        exit 1
    fi
    printf '%s\n' "$KAFKA_CONTROLLER_PORT" >"$KAFKA_FORMAT_STAMP"
}

start_kafka() {
    local pid
    if pid=$(running_pid kafka); then
        log "kafka: already running (pid $pid, port $KAFKA_PORT)"
        return
    fi
    clear_stale_pid kafka
    require_port_free "$KAFKA_PORT" "Kafka" HOMETEAM_KAFKA_PORT
    require_port_free "$KAFKA_CONTROLLER_PORT" "Kafka controller" HOMETEAM_KAFKA_CONTROLLER_PORT
    write_kafka_props
    format_kafka
    local -a java_args
    mapfile -d '' java_args < <(kafka_java)
    KAFKA_LOG_OFFSET=$(log_offset "$KAFKA_LOG")
    printf '\n===== %s stack.sh: starting kafka =====\n' "$(date -Is)" >>"$KAFKA_LOG"
    # Run from the Kafka state dir so any JVM crash files land there, not in the caller's cwd.
    (cd "$KAFKA_DIR" && launch "$KAFKA_LOG" "${java_args[@]}" kafka.Kafka "$KAFKA_PROPS" &&
        printf '%s\n' "$LAUNCHED_PID" >"$PID_DIR/kafka.pid")
    pid=$(<"$PID_DIR/kafka.pid")
    log "kafka: started pid $pid (log $KAFKA_LOG)"
}

wait_kafka() {
    local pid rc=0
    pid=$(<"$PID_DIR/kafka.pid")
    probe kafka-ready --bootstrap "$KAFKA_BOOTSTRAP" --timeout "$KAFKA_START_TIMEOUT" --pid "$pid" || rc=$?
    ((rc == 0)) || startup_failed kafka "$KAFKA_LOG" "${KAFKA_LOG_OFFSET:-0}" "$pid"
}

# ----------------------------------------------------------------------------- ferretdb

start_ferret() {
    local pid
    if pid=$(running_pid ferretdb); then
        log "ferretdb: already running (pid $pid, port $MONGO_PORT)"
        return
    fi
    clear_stale_pid ferretdb
    require_port_free "$MONGO_PORT" "FerretDB" HOMETEAM_MONGO_PORT
    mkdir -p "$FERRET_DATA"
    FERRET_LOG_OFFSET=$(log_offset "$FERRET_LOG")
    printf '\n===== %s stack.sh: starting ferretdb =====\n' "$(date -Is)" >>"$FERRET_LOG"
    (cd "$STATE_DIR/ferretdb" && launch "$FERRET_LOG" "$FERRET_BIN" \
        -listen-addr "127.0.0.1:$MONGO_PORT" -data-dir "$FERRET_DATA" -log-level warn \
        ${HOMETEAM_FERRET_DEBUG_ADDR:+-debug-addr "$HOMETEAM_FERRET_DEBUG_ADDR"} \
        ${HOMETEAM_FERRET_ARGS:-} &&
        printf '%s\n' "$LAUNCHED_PID" >"$PID_DIR/ferretdb.pid")
    pid=$(<"$PID_DIR/ferretdb.pid")
    log "ferretdb: started pid $pid (log $FERRET_LOG)"
}

wait_ferret() {
    local pid rc=0
    pid=$(<"$PID_DIR/ferretdb.pid")
    probe mongo-ready --url "$MONGODB_URL" --timeout "$MONGO_START_TIMEOUT" --pid "$pid" || rc=$?
    ((rc == 0)) || startup_failed ferretdb "$FERRET_LOG" "${FERRET_LOG_OFFSET:-0}" "$pid"
}

# ----------------------------------------------------------------------------- commands

make_dirs() {
    mkdir -p "$CACHE_DIR" "$BIN_DIR" "$KAFKA_DIR" "$STATE_DIR/ferretdb" "$LOG_DIR" "$PID_DIR"
}

# Serialize concurrent `up`/`down` runs on one state dir (if flock is available).
take_lock() {
    mkdir -p "$STATE_DIR"
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$STATE_DIR/stack.lock"
        flock -w 600 9 || die "another scripts/stack.sh holds $STATE_DIR/stack.lock"
    fi
}

print_env() {
    local prefix=""
    [[ ${1:-} == --export ]] && prefix="export "
    printf '%sKAFKA_BOOTSTRAP_SERVERS=%s\n' "$prefix" "$KAFKA_BOOTSTRAP"
    printf "%sMONGODB_URL='%s'\n" "$prefix" "$MONGODB_URL"
}

cmd_up() {
    check_tools
    take_lock
    make_dirs
    ensure_kafka_lib
    ensure_ferret_bin
    start_kafka
    start_ferret # starts while the JVM boots
    wait_kafka
    wait_ferret
    cmd_topics >&2 # stdout carries only the env lines
    log "stack is up (state in $STATE_DIR)"
    print_env
}

cmd_down() {
    local purge=0
    case ${1:-} in
    "") ;;
    --purge) purge=1 ;;
    *) usage ;;
    esac
    [[ -d $STATE_DIR ]] || {
        log "nothing to do: no state dir $STATE_DIR"
        return
    }
    take_lock
    mkdir -p "$PID_DIR"
    stop_pids kafka ferretdb
    if ((purge)); then
        log "purging data: $KAFKA_DATA $FERRET_DATA"
        rm -rf "$KAFKA_DATA" "$KAFKA_FORMAT_STAMP" "$FERRET_DATA"
    fi
}

cmd_status() {
    local pid ok=0
    if pid=$(running_pid kafka); then
        echo "kafka:    running (pid $pid, port $KAFKA_PORT, controller port $KAFKA_CONTROLLER_PORT)"
    else
        echo "kafka:    not running"
        ok=1
    fi
    if pid=$(running_pid ferretdb); then
        echo "ferretdb: running (pid $pid, port $MONGO_PORT)"
    else
        echo "ferretdb: not running"
        ok=1
    fi
    return "$ok"
}

cmd_topics() {
    check_python
    log "topics: ensuring the topics of shared.contracts.registry exist"
    probe create-topics --bootstrap "$KAFKA_BOOTSTRAP" --timeout 60
}

main() {
    local cmd=${1:-}
    [[ $# -gt 0 ]] && shift
    case $cmd in
    up) [[ $# -eq 0 ]] || usage; cmd_up ;;
    down) cmd_down "$@" ;;
    status) [[ $# -eq 0 ]] || usage; cmd_status ;;
    topics) [[ $# -eq 0 ]] || usage; cmd_topics ;;
    env)
        [[ $# -eq 0 || ($# -eq 1 && $1 == --export) ]] || usage
        print_env "$@"
        ;;
    -h | --help | help) usage ;;
    *) usage ;;
    esac
}

main "$@"
