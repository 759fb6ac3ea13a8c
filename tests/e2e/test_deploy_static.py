"""The deployment files, checked without Docker or a cluster.

Each of tools/check_deploy.sh's checks runs as a test (hadolint, kubernetes-validate, the
compose and workflow schemas, nginx -t, promtool), so a failure names the check. The tests
below them check what no linter knows: that the files agree with each other and with Salvo
(settings names, ports, drain time against grace periods, replicas against scrape targets).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from salvo.ops.settings import Settings
from tests.tools import IN_CI

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHECK_DEPLOY = ROOT / "tools" / "check_deploy.sh"
VENV_BIN = Path(sys.executable).parent


def _installed(tool: str) -> bool:
    # Where tools/check_deploy.sh looks: this venv's bin first, then PATH.
    return (VENV_BIN / tool).exists() or shutil.which(tool) is not None


# Each check and the tool it runs.
CHECKS = {
    "hadolint": "hadolint",
    "k8s": "kubernetes-validate",
    "compose": "check-jsonschema",
    "workflow": "check-jsonschema",
    "nginx": "nginx",
    "prometheus": "promtool",
}


@pytest.mark.parametrize("check", list(CHECKS))
def test_check_deploy(check: str) -> None:
    # In CI every tool must be there (make test installs them), so a missing one fails there.
    if not _installed(CHECKS[check]) and not IN_CI:
        pytest.skip(f"tool for {check!r} not installed: run tools/check_deploy.sh install")
    result = subprocess.run(
        ["bash", str(CHECK_DEPLOY), check],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "VENV": sys.prefix},
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- helpers ---------------------------------------------------------------------------


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _k8s(kind: str, name: str = "salvo") -> dict:
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in _yaml_docs(path):
            if doc.get("kind") == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} under deploy/k8s")


def _env_list(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def _check_salvo_env(names, where: str) -> None:
    """Every SALVO_* variable named in a deployment file is a real setting."""
    fields = set(Settings.model_fields)
    unknown = [n for n in names if n.startswith("SALVO_") and n[6:].lower() not in fields]
    assert not unknown, f"{where}: {unknown} are not Salvo settings ({sorted(fields)})"


DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.gpu"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", path.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _runtime_stage(path: Path) -> list[tuple[str, str]]:
    instructions = _instructions(path)
    start = max(i for i, (k, rest) in enumerate(instructions) if k == "FROM")
    assert instructions[start][1].endswith("AS runtime"), "the last stage is the runtime"
    return instructions[start:]


# --- Dockerfiles -----------------------------------------------------------------------


def _without_variants(path: Path) -> str:
    """The file less its leading comments and its `# variant: begin/end` blocks."""
    text = path.read_text()
    text = re.sub(r"# variant: begin\n.*?# variant: end\n", "", text, flags=re.S)
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "".join(lines)


def test_dockerfiles_share_everything_but_their_variant_blocks() -> None:
    cpu, gpu = (_without_variants(p) for p in DOCKERFILES)
    assert cpu == gpu, "Dockerfile and Dockerfile.gpu differ outside their variant blocks"
    for path in DOCKERFILES:
        assert path.read_text().count("# variant: begin") == 2, path


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runtime_stage(path: Path) -> None:
    runtime = _runtime_stage(path)
    keywords = [k for k, _ in runtime]
    args = {k: [a for kk, a in runtime if kk == k] for k in keywords}
    assert args["EXPOSE"] == ["8001 8002"]
    assert args["VOLUME"] == ['["/models"]']
    # A numeric uid (hadolint DL3066, Kubernetes runAsNonRoot), and the image ends as it.
    assert keywords[-4:] == ["HEALTHCHECK", "STOPSIGNAL", "ENTRYPOINT", "CMD"]
    assert args["USER"] == ["10001:10001"]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    # The health check runs the script the stage copies in.
    script = next(a.split()[-1] for a in args["COPY"] if "healthcheck.py" in a)
    assert script in args["HEALTHCHECK"][0]
    # Dependency layers come before the wheel, so a code change does not reinstall them.
    runs = args["RUN"]
    torch = next(i for i, r in enumerate(runs) if "torch==" in r)
    deps = next(i for i, r in enumerate(runs) if "runtime.txt" in r)
    wheel = next(i for i, r in enumerate(runs) if "salvo-*.whl" in r)
    assert torch < deps < wheel
    # Every SALVO_ default is a real setting; the ones a container needs are set.
    env = dict(re.findall(r"(SALVO_\w+)=(\S+)", " ".join(args["ENV"])))
    _check_salvo_env(env, path.name)
    assert env["SALVO_HOST"] == "0.0.0.0"
    assert env["SALVO_MODEL_REPOSITORY"] == "/models"
    assert (env["SALVO_GRPC_PORT"], env["SALVO_HTTP_PORT"]) == ("8001", "8002")


def test_exported_requirements_match_pyproject(tmp_path: Path) -> None:
    exporter = _load_module(DEPLOY / "docker" / "requirements.py")
    runtime, build = exporter.export(ROOT / "pyproject.toml")
    assert not any(r.startswith("torch") for r in runtime), "torch comes from its own index"
    assert {"grpcio-health-checking", "pydantic-settings"} <= {exporter._name(r) for r in runtime}
    assert any(r.startswith("grpcio-tools==") for r in build), "stubs need pinned grpcio-tools"


# --- nginx -----------------------------------------------------------------------------


def test_nginx_template_renders_one_server_line_per_backend() -> None:
    render = _load_module(DEPLOY / "nginx" / "render.py")
    text = render.render("127.0.0.1:9000", ["10.0.0.1:8001", "10.0.0.2:8001"])
    servers = re.findall(r"^\s*server (\S+) max_fails=1 fail_timeout=10s;", text, re.M)
    assert servers == ["10.0.0.1:8001", "10.0.0.2:8001"]
    assert re.search(r"^\s*listen 127\.0\.0\.1:9000 http2;", text, re.M)
    assert "grpc_pass grpc://salvo_backends;" in text
    with pytest.raises(ValueError, match="placeholder"):
        render.render("x:1", ["y:2"], template="listen ${PORT};\n")


def test_nginx_in_flight_limit_is_per_replica_times_the_replicas() -> None:
    render = _load_module(DEPLOY / "nginx" / "render.py")
    limit = re.compile(r"^\s*limit_conn salvo_in_flight (\d+);", re.M)
    two = ["10.0.0.1:8001", "10.0.0.2:8001"]
    assert limit.findall(render.render("127.0.0.1:9000", two)) == ["128"]
    assert limit.findall(render.render("127.0.0.1:9000", two, max_in_flight=5)) == ["10"]
    # The compose rendering: three replicas at the default.
    assert limit.findall((DEPLOY / "nginx" / "nginx.conf").read_text()) == ["192"]
    with pytest.raises(ValueError, match="max_in_flight"):
        render.render("127.0.0.1:9000", two, max_in_flight=0)


# --- compose ---------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text))


def test_compose_topology_agrees_with_nginx_and_prometheus() -> None:
    services = _compose()["services"]
    replicas = sorted(name for name in services if re.fullmatch(r"salvo-\d+", name))
    assert len(replicas) >= 2
    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text()
    upstream = re.findall(r"^\s*server (\S+) max_fails", nginx, re.M)
    assert upstream == [f"{r}:8001" for r in replicas]
    assert set(services["nginx"]["depends_on"]) == set(replicas)
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    salvo_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "salvo")
    assert salvo_job["static_configs"][0]["targets"] == [f"{r}:8002" for r in replicas]
    for name in replicas:
        service = services[name]
        env = service["environment"]
        _check_salvo_env(env, f"compose {name}")
        # `docker compose stop` must let a replica drain before it kills it.
        grace_s = float(
            env.get("SALVO_SHUTDOWN_GRACE_S", Settings.model_fields["shutdown_grace_s"].default)
        )
        shutdown_s = grace_s + float(env["SALVO_DRAIN_TIMEOUT_S"])
        assert _duration_s(service["stop_grace_period"]) > shutdown_s
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://otel-collector:")
        assert env["OTEL_RESOURCE_ATTRIBUTES"] == f"service.instance.id={name}"


def test_compose_mounts_exist() -> None:
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def test_otel_collector_pipelines_use_defined_components() -> None:
    config = yaml.safe_load((DEPLOY / "otel" / "collector.yaml").read_text())
    service = config["service"]
    assert set(service["extensions"]) <= set(config["extensions"])
    assert service["pipelines"], "no pipelines"
    for name, pipeline in service["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            missing = set(pipeline.get(kind, [])) - set(config.get(kind, {}))
            assert not missing, f"pipeline {name}: {kind} {missing} are not defined"
    # Salvo's replicas push to the port the OTLP gRPC receiver listens on.
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")


def test_grafana_dashboard_uses_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    uids = {d["uid"] for d in provisioned["datasources"]}
    for path in (DEPLOY / "grafana" / "dashboards").glob("*.json"):
        dashboard = json.loads(path.read_text())
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in dashboard["panels"]:
            for target in [panel, *panel.get("targets", [])]:
                assert target["datasource"]["uid"] in uids, f"{path.name}: {panel['title']}"


# --- Kubernetes ------------------------------------------------------------------------


def _container(spec: dict) -> dict:
    (container,) = spec["containers"]
    return container


def test_k8s_shutdown_fits_in_the_grace_period() -> None:
    pod = _k8s("Deployment")["spec"]["template"]["spec"]
    container = _container(pod)
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    env = _env_list(container)
    # Salvo's own shutdown: the grace (new calls still served), then the drain.
    shutdown_s = float(env["SALVO_SHUTDOWN_GRACE_S"]) + float(env["SALVO_DRAIN_TIMEOUT_S"])
    # Past the grace period the kubelet kills the pod: preStop, then the whole shutdown, must fit.
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + shutdown_s
    # Liveness must not restart a pod during its shutdown (health is NOT_SERVING then).
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > shutdown_s


def test_k8s_deployment_probes_services_and_policies_agree() -> None:
    deployment = _k8s("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(pod)
    _check_salvo_env(_env_list(container), "deployment.yaml")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 8001, "metrics": 8002}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    claim = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert (
        claim["persistentVolumeClaim"]["claimName"]
        == _k8s("PersistentVolumeClaim", "salvo-models")["metadata"]["name"]
    )
    # The image runs as uid 10001; runAsNonRoot can only verify a numeric uid.
    assert pod["securityContext"]["runAsUser"] == 10001

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for name in ("salvo", "salvo-headless"):
        service = _k8s("Service", name)
        assert service["spec"]["selector"].items() <= labels.items(), name
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["targetPort"] in ("grpc", 8001)
    assert _k8s("Service", "salvo-headless")["spec"]["clusterIP"] == "None"
    assert _k8s("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()

    hpa = _k8s("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "salvo"}
    custom = [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert custom == ["salvo_queue_depth"]
    assert {m["resource"]["name"] for m in hpa["metrics"] if m["type"] == "Resource"} == {"cpu"}
    # The adapter's rule publishes the metric under the name the HPA asks for.
    adapter = _k8s("ConfigMap", "prometheus-adapter-salvo")
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert any(rule["name"]["as"] == "salvo_queue_depth" for rule in rules)


def test_kustomization_lists_existing_manifests() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (DEPLOY / "k8s" / resource).is_file(), resource
    # The Deployment's `image: salvo` is what the images transformer replaces.
    image = _container(_k8s("Deployment")["spec"]["template"]["spec"])["image"]
    assert image in {i["name"] for i in kustomization["images"]}


def test_kserve_inferenceservice_serves_grpc_on_h2c() -> None:
    # kubernetes-validate has no schema for this CRD: check the fields KServe routes by.
    (isvc,) = _yaml_docs(DEPLOY / "k8s" / "kserve" / "inferenceservice.yaml")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = isvc["spec"]["predictor"]
    container = _container(predictor)
    assert container["name"] == "kserve-container"
    assert container["ports"] == [{"name": "h2c", "containerPort": 8001, "protocol": "TCP"}]
    env = _env_list(container)
    _check_salvo_env(env, "inferenceservice.yaml")
    # KServe's storage initializer downloads STORAGE_URI into /mnt/models.
    assert env["SALVO_MODEL_REPOSITORY"] == "/mnt/models" and "STORAGE_URI" in env
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    shutdown_s = float(env["SALVO_SHUTDOWN_GRACE_S"]) + float(env["SALVO_DRAIN_TIMEOUT_S"])
    assert predictor["terminationGracePeriodSeconds"] > pre_stop_s + shutdown_s
