#!/usr/bin/env bash
# Install what the tests need (a venv from pyproject.toml; Debian packages and real engines for the
# engine tier) and run every tier. This is the README's test command and what .ci/run calls.
#   bash tests/run.sh              all tiers: fast, faults, registry, engines
#   bash tests/run.sh --no-engines the tiers that need no container engine
set -euo pipefail
cd "$(dirname "$0")/.."
engines=1
[ "${1:-}" = "--no-engines" ] && engines=0

venv=${ISEP_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
"$venv/bin/python" -m pip install -q -e '.[test]'
export PATH="$PWD/$venv/bin:$PATH"

echo "== lint and types: ruff, mypy (configured in pyproject.toml)"
python -m ruff check isep
python -m mypy isep

# tests/test_differential.py builds tests/godiff (Go's standard library only) to read archives as the
# loaders do; tests/test_delta.py decodes a delta with the zstd CLI. Without them both fail under CI=true.
if ! command -v go >/dev/null 2>&1 || ! command -v zstd >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q golang-go zstd >/dev/null
  else
    echo "go or zstd is missing (apt-get install golang-go zstd): the differential and delta CLI tests cannot run" >&2
  fi
fi

echo "== fast tier: unit, property, CLI and round-trip tests"
python -m pytest -q -p no:cacheprovider tests --ignore=tests/engines

# Devices run older systems than build hosts (Debian 11, RHEL 9, openEuler 22.03 ship Python 3.9):
# the same fast tier under Debian 11's python3.9, unpacked privately (tests/get-py39.sh). The
# fuzzers need atheris, which has no 3.9 build here: they run above, under the main interpreter.
if [ "${ISEP_SKIP_PY39:-0}" != 1 ]; then
  echo "== fast tier under Python 3.9 (Debian 11's interpreter)"
  py39=${ISEP_PY39:-/tmp/isep-py39}
  [ -x "$py39/venv/bin/python" ] || bash tests/get-py39.sh "$py39" >/dev/null
  (
    . "$py39/env.sh"
    python -m pip install -q -e '.[test]'
    python -c 'import sys; assert sys.version_info[:2] == (3, 9), sys.version'
    python -m pytest -q -p no:cacheprovider tests --ignore=tests/engines --ignore=tests/faults/test_fuzz.py
  )
fi

# The registry tier: Debian's docker-registry (open, Basic auth, token auth, pull-through cache) run
# as plain processes on 127.0.0.1 with private storage under /tmp/isep-registry, stopped by pid.
echo "== registry tier: docker-registry (distribution 2.8), tests/registry"
bash tests/registry/registry.sh install
bash tests/registry/registry.sh start
status=0
ISEP_REGISTRY=1 python -m pytest -q -p no:cacheprovider -m registry tests/registry || status=$?
bash tests/registry/registry.sh stop || true
[ "$status" = 0 ] || exit "$status"

if [ "$engines" = 1 ]; then
  echo "== engine tier: real docker (20.10, 26, 28 containerd store), podman, containerd, sshd"
  bash tests/engines/engines.sh install
  bash tests/engines/engines.sh start
  status=0
  ISEP_ENGINES=1 python -m pytest -q -p no:cacheprovider -m engines tests/engines || status=$?
  bash tests/engines/engines.sh stop || true
  exit $status
fi
