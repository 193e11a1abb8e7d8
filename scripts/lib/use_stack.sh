# Sourced by scripts/test.sh and scripts/bench.sh (from the repository root): unless
# KAFKA_BOOTSTRAP_SERVERS and MONGODB_URL already point somewhere, start the local Kafka +
# FerretDB stack (reusing one that runs), export its addresses, and on exit stop it again
# only if this script started it.
started_stack=0
if [[ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" || -z "${MONGODB_URL:-}" ]]; then
    if ! bash scripts/stack.sh status >/dev/null 2>&1; then
        started_stack=1
    fi
    stack_env=$(bash scripts/stack.sh up)
    eval "$(printf '%s\n' "$stack_env" | sed 's/^/export /')"
fi

stop_stack_if_started() {
    if ((started_stack)); then
        bash scripts/stack.sh down >&2 || true
    fi
}
trap stop_stack_if_started EXIT
