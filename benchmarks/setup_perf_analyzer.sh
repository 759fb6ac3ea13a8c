#!/usr/bin/env bash
# Install Triton's perf_analyzer (the benchmark driver) into its own virtualenv.
#
#   benchmarks/setup_perf_analyzer.sh [VENV_DIR]      (default: <repo>/.venv-perf)
#
# Idempotent: a second run changes nothing and takes about a second.
# Needs root (or sudo) only when a Debian package is missing; otherwise any user.
#
# Why these pins (Debian 12, glibc 2.36):
#   - perf_analyzer ships inside tritonclient[grpc] wheels (the `perf-analyzer` PyPI
#     package is an empty placeholder). 2.52+ need glibc 2.38, so 2.51.0 is the newest
#     that runs here.
#   - it links libb64.so.0d (Debian: libb64-0d) and libcudart.so.12 even without a GPU;
#     the CUDA runtime comes from PyPI's nvidia-cuda-runtime-cu12, pinned to CUDA 12.6
#     (what Triton 24.10 = tritonclient 2.51.0 was built against).
# Run it through the wrapper benchmarks/perf_analyzer, which sets LD_LIBRARY_PATH.
set -euo pipefail

TRITONCLIENT_VERSION=2.51.0
CUDA_RUNTIME_VERSION=12.6.77
PYTHON=${PYTHON:-python3}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$here/.." && pwd)
venv=${1:-$repo_root/.venv-perf}

log() { printf '[setup_perf_analyzer] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---- system packages --------------------------------------------------------
have_lib() {
    local ldconfig
    ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
    "$ldconfig" -p 2>/dev/null | grep -q "[[:space:]]$1 " && return 0
    # Fall back to the usual multiarch directories (ldconfig cache may be stale).
    compgen -G "/usr/lib/*-linux-gnu/$1" >/dev/null || compgen -G "/usr/lib/$1" >/dev/null
}

apt_packages=()
have_lib libb64.so.0d || apt_packages+=(libb64-0d)
if ! command -v "$PYTHON" >/dev/null; then
    apt_packages+=(python3 python3-venv)
elif [[ ! -x "$venv/bin/python" ]] && ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    # Debian splits venv/ensurepip out of python3.
    apt_packages+=(python3-venv)
fi

if ((${#apt_packages[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        sudo=()
    elif command -v sudo >/dev/null; then
        sudo=(sudo)
    else
        die "missing Debian packages: ${apt_packages[*]}; run as root or: apt-get install -y ${apt_packages[*]}"
    fi
    command -v apt-get >/dev/null || die "no apt-get; install ${apt_packages[*]} (or equivalents) by hand"
    log "apt-get install ${apt_packages[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
    have_lib libb64.so.0d || die "libb64.so.0d still not found after installing libb64-0d"
else
    log "system libraries present (libb64.so.0d); skipping apt"
fi

# ---- virtualenv -------------------------------------------------------------
if [[ ! -x "$venv/bin/python" ]]; then
    log "creating virtualenv $venv"
    "$PYTHON" -m venv "$venv"
fi

installed_ok() {
    "$venv/bin/python" - "$TRITONCLIENT_VERSION" "$CUDA_RUNTIME_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
import grpc  # noqa: F401  (tritonclient[grpc] extra present)
ok = (version("tritonclient") == sys.argv[1]
      and version("nvidia-cuda-runtime-cu12") == sys.argv[2])
sys.exit(0 if ok else 1)
EOF
}

if installed_ok && [[ -x "$venv/bin/perf_analyzer" ]]; then
    log "tritonclient $TRITONCLIENT_VERSION and nvidia-cuda-runtime-cu12 $CUDA_RUNTIME_VERSION already installed"
else
    log "pip install tritonclient[grpc]==$TRITONCLIENT_VERSION nvidia-cuda-runtime-cu12==$CUDA_RUNTIME_VERSION"
    "$venv/bin/python" -m pip install -q \
        "tritonclient[grpc]==$TRITONCLIENT_VERSION" \
        "nvidia-cuda-runtime-cu12==$CUDA_RUNTIME_VERSION"
fi
[[ -x "$venv/bin/perf_analyzer" ]] || die "$venv/bin/perf_analyzer missing after install"

# ---- smoke test -------------------------------------------------------------
venv_abs=$(cd "$venv" && pwd)
if ! version_out=$(PERF_VENV="$venv_abs" "$here/perf_analyzer" --version 2>&1); then
    printf '%s\n' "$version_out" >&2
    die "perf_analyzer does not run (see above)"
fi
log "ok: $version_out"
if [[ "$venv_abs" != "$repo_root/.venv-perf" ]]; then
    log "non-default venv: export PERF_VENV=$venv_abs before running benchmarks/perf_analyzer"
fi
