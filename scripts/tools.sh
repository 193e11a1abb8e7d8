#!/usr/bin/env bash
# Installs the offline validators the deploy tests use, if they are missing, and prints where
# they are (one "name: path (version)" line each on stdout; progress on stderr):
#   docker-compose  Debian's docker-compose (v1): `docker-compose config` parses and validates
#                   docker-compose.yml without a Docker engine (apt-get, as root)
#   kustomize       renders deploy/k8s overlays; built with `go install` into
#                   $HOMETEAM_STATE_DIR/bin (default <repo>/.stack/bin) at a pinned version
# Safe to run again: a tool already in place (kustomize at the pinned version) is left alone.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

KUSTOMIZE_VERSION=v5.8.1
STATE_DIR=${HOMETEAM_STATE_DIR:-$REPO_ROOT/.stack}
case $STATE_DIR in /*) ;; *) STATE_DIR=$PWD/$STATE_DIR ;; esac
BIN_DIR=$STATE_DIR/bin
KUSTOMIZE=$BIN_DIR/kustomize

say() { printf 'tools: %s\n' "$*" >&2; }
die() { printf 'tools: error: %s\n' "$*" >&2; exit 1; }

# --------------------------------------------------------------------------- docker-compose
if ! command -v docker-compose >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 \
        || die "missing tool: docker-compose (install Debian's docker-compose package; apt-get not found)"
    if [[ $(id -u) -ne 0 ]]; then
        die "missing tool: docker-compose (run as root, or: sudo apt-get install -y docker-compose)"
    fi
    say "installing docker-compose with apt-get (first time only)"
    apt_log=$(mktemp)
    trap 'rm -f "$apt_log"' EXIT
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get update -qq >"$apt_log" 2>&1 \
        || ! apt-get install -y -qq --no-install-recommends docker-compose >>"$apt_log" 2>&1; then
        tail -n 20 "$apt_log" >&2
        die "missing tool: docker-compose (apt-get install docker-compose failed)"
    fi
    command -v docker-compose >/dev/null 2>&1 || die "missing tool: docker-compose (not on PATH after install)"
fi
COMPOSE_PATH=$(command -v docker-compose)
COMPOSE_VERSION=$(docker-compose version --short 2>/dev/null) \
    || die "docker-compose at $COMPOSE_PATH does not run (docker-compose version --short failed)"

# --------------------------------------------------------------------------- kustomize
kustomize_version() { "$KUSTOMIZE" version 2>/dev/null | head -n1 | tr -d '[:space:]'; }

if [[ ! -x $KUSTOMIZE || $(kustomize_version) != "$KUSTOMIZE_VERSION" ]]; then
    command -v go >/dev/null 2>&1 \
        || die "missing tool: go (needed to build kustomize $KUSTOMIZE_VERSION into $BIN_DIR)"
    mkdir -p "$BIN_DIR"
    say "building kustomize $KUSTOMIZE_VERSION with go install (first time only)"
    GOBIN=$BIN_DIR GOFLAGS=-mod=mod go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION" >&2 \
        || die "missing tool: kustomize (go install sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION failed)"
    [[ $(kustomize_version) == "$KUSTOMIZE_VERSION" ]] \
        || die "kustomize at $KUSTOMIZE reports '$(kustomize_version)', expected $KUSTOMIZE_VERSION"
fi

printf 'docker-compose: %s (%s)\n' "$COMPOSE_PATH" "$COMPOSE_VERSION"
printf 'kustomize: %s (%s)\n' "$KUSTOMIZE" "$KUSTOMIZE_VERSION"
