#!/usr/bin/env bash
# Install Seldon MLServer (the peer that benchmarks/compare.py measures Salvo against) into
# its own virtualenv, never touching the project's .venv.
#
#   benchmarks/setup_mlserver.sh [VENV_DIR]      (default: <repo>/.venv-mlserver)
#
# Idempotent: when the pinned versions are already there it changes nothing.
#
# Why these pins:
#   - torch 2.13.0 is the CPU build Salvo serves with, so both servers run the same kernels;
#     it goes in first, from local disk, or pip would resolve a multi-GB CUDA build.
#   - mlserver 1.7.1 is the newest release.
#   - uvloop 0.21.0: with 0.23 MLServer's worker process crash-loops
#     ("There is no current event loop").
set -euo pipefail

TORCH_VERSION=2.13.0
MLSERVER_VERSION=1.7.1
UVLOOP_VERSION=0.21.0
PYTHON=${PYTHON:-python3}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${1:-$here/../.venv-mlserver}

log() { printf '[setup_mlserver] %s\n' "$*" >&2; }

if [[ ! -x "$venv/bin/python" ]]; then
    log "creating virtualenv $venv"
    "$PYTHON" -m venv "$venv"
fi

installed_ok() {
    "$venv/bin/python" - "$TORCH_VERSION" "$MLSERVER_VERSION" "$UVLOOP_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
wanted = dict(zip(("torch", "mlserver", "uvloop"), sys.argv[1:]))
sys.exit(0 if all(version(n).split("+")[0] == v for n, v in wanted.items()) else 1)
PY
}

if installed_ok; then
    log "torch $TORCH_VERSION, mlserver $MLSERVER_VERSION, uvloop $UVLOOP_VERSION already installed"
else
    log "pip install torch==$TORCH_VERSION, then mlserver==$MLSERVER_VERSION uvloop==$UVLOOP_VERSION"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "torch==$TORCH_VERSION"
    "$venv/bin/python" -m pip install -q "torch==$TORCH_VERSION" \
        "mlserver==$MLSERVER_VERSION" "uvloop==$UVLOOP_VERSION"
    installed_ok || { log "error: pinned versions missing after install"; exit 1; }
fi
log "ok: $("$venv/bin/mlserver" --version 2>&1 | tail -n 1)"
