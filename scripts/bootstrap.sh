#!/usr/bin/env bash
# Sets up a fresh machine for towerstream, idempotently: Debian packages (a JDK and Maven for
# the local Kafka broker, Prometheus for the metrics tests), a virtual env in .venv with every
# Python dependency, and the Kafka broker jars. Reruns are fast: PyPI wheels (torch is several
# GB) are kept in ~/.cache/towerstream/wheels, the Kafka jars in ~/.m2 and ~/.cache/towerstream.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
t0=$(date +%s)
log() { echo "[bootstrap $(( $(date +%s) - t0 ))s] $*" >&2; }

need=()
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
command -v prometheus >/dev/null || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  log "installing Debian packages: ${need[*]}"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

wheels="${TOWERSTREAM_WHEELHOUSE:-$HOME/.cache/towerstream/wheels}"
mkdir -p "$wheels"
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.towerstream-deps
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # Offline first: when the wheelhouse already holds everything, no registry is asked at all
  # (resolving torch against the index alone costs minutes). Otherwise fill it, then install.
  install() {
    .venv/bin/pip install -q --no-index --find-links "$wheels" setuptools wheel &&
    .venv/bin/pip install -q --no-index --find-links "$wheels" -e ".[test,confluent]"
  }
  if ! install 2>/dev/null; then
    log "downloading wheels into $wheels (files already there are reused)"
    .venv/bin/pip download -q -d "$wheels" setuptools wheel ".[test,confluent]"
    log "installing into .venv"
    install
  fi
  touch "$stamp"
fi

log "resolving the Kafka broker jars"
.venv/bin/python -c "from streams.broker import BrokerConfig, ensure_jars; ensure_jars(BrokerConfig())"
log "ready"
