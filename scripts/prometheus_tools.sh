#!/usr/bin/env bash
# Installs Prometheus' offline tools if they are missing, and prints where they are (one
# "name: path (version)" line each on stdout; progress on stderr):
#   promtool    checks deploy/prometheus/prometheus*.yml and the rule files and runs the rule
#               unit tests in deploy/prometheus/tests/ (tests/integration/test_prometheus_rules.py)
#   prometheus  the server itself (not started here; docker compose runs its own image)
# Both come from Debian's `prometheus` package (apt-get, as root, without recommends).
#
# The package's maintainer scripts would start a system Prometheus listening on :9090 where an
# init system lets them. This script forbids that during the install (a temporary
# /usr/sbin/policy-rc.d answering 101, only if none exists) and afterwards stops, by pid, any
# prometheus process that the install started anyway. Safe to run again: nothing is done when
# promtool and prometheus are already on PATH.
set -euo pipefail

say() { printf 'prometheus_tools: %s\n' "$*" >&2; }
die() { printf 'prometheus_tools: error: %s\n' "$*" >&2; exit 1; }

# pids of running prometheus servers (by executable name), one a line
prometheus_pids() { pgrep -x prometheus 2>/dev/null || true; }

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    missing=$(for t in promtool prometheus; do command -v "$t" >/dev/null 2>&1 || printf '%s ' "$t"; done)
    missing=${missing% }
    command -v apt-get >/dev/null 2>&1 \
        || die "missing tool: $missing (install Debian's prometheus package; apt-get not found)"
    if [[ $(id -u) -ne 0 ]]; then
        die "missing tool: $missing (run as root, or: sudo apt-get install -y --no-install-recommends prometheus)"
    fi

    apt_log=$(mktemp)
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    cleanup() {
        rm -f "$apt_log"
        if [[ $made_policy -eq 1 ]]; then rm -f "$policy"; fi
    }
    trap cleanup EXIT
    if [[ ! -e $policy ]]; then
        # invoke-rc.d asks this before starting a service: 101 = "action forbidden".
        printf '#!/bin/sh\n# temporary, from hometeam scripts/prometheus_tools.sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        made_policy=1
    fi

    before=$(prometheus_pids)
    say "installing Debian's prometheus package with apt-get (first time only; missing: $missing)"
    started=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get update -qq >"$apt_log" 2>&1 \
        || ! apt-get install -y -qq --no-install-recommends prometheus >>"$apt_log" 2>&1; then
        tail -n 20 "$apt_log" >&2
        die "missing tool: $missing (apt-get install prometheus failed)"
    fi
    say "installed in $((SECONDS - started))s"

    # Whatever the maintainer scripts started anyway (a sysvinit script, say) must not hold :9090.
    for pid in $(prometheus_pids); do
        if ! grep -qx "$pid" <<<"$before"; then
            say "stopping the system prometheus (pid $pid) the package install started"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
        fi
    done

    for t in promtool prometheus; do
        command -v "$t" >/dev/null 2>&1 || die "missing tool: $t (not on PATH after installing Debian's prometheus package)"
    done
fi

PROMTOOL_PATH=$(command -v promtool)
PROMETHEUS_PATH=$(command -v prometheus)
PROMTOOL_VERSION=$(promtool --version 2>&1 | sed -n 's/^promtool, version \([^ ]*\).*/\1/p' | head -n1) \
    || die "promtool at $PROMTOOL_PATH does not run (promtool --version failed)"
PROMETHEUS_VERSION=$(prometheus --version 2>&1 | sed -n 's/^prometheus, version \([^ ]*\).*/\1/p' | head -n1) \
    || die "prometheus at $PROMETHEUS_PATH does not run (prometheus --version failed)"
[[ -n $PROMTOOL_VERSION ]] || die "promtool at $PROMTOOL_PATH does not run (promtool --version printed no version)"
[[ -n $PROMETHEUS_VERSION ]] || die "prometheus at $PROMETHEUS_PATH does not run (prometheus --version printed no version)"

printf 'prometheus: %s (%s)\n' "$PROMETHEUS_PATH" "$PROMETHEUS_VERSION"
printf 'promtool: %s (%s)\n' "$PROMTOOL_PATH" "$PROMTOOL_VERSION"
