"""Debian's real Prometheus scrapes a real Salvo under a short load: every query of the
Grafana dashboard and every operand of every alert rule returns data."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml

from tests.servers import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))

# `make test` installs it (tools/check_deploy.sh install); in CI a missing one fails.
pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None and not os.environ.get("CI"),
    reason="Debian's prometheus is not installed (make deploy-tools)",
)


def dashboard_queries() -> list[str]:
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                queries.append(target["expr"].replace("$__rate_interval", "15s"))
    return queries


def rule_operands() -> list[str]:
    """Each side of each comparison in each alert: the quantities the alerts watch."""
    operands = []
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                for clause in re.split(r"\band\b", " ".join(rule["expr"].split())):
                    for side in re.split(r"\s(?:>|<|==|!=|>=|<=)\s", clause):
                        side = side.strip()
                        if side and not re.fullmatch(r"[0-9.]+", side):
                            operands.append(side)
    return operands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def repo(tmp_path, demo_repo):
    root = tmp_path / "repo"
    shutil.copytree(demo_repo / "mlp", root / "mlp")
    shutil.copytree(demo_repo / "mlp", root / "mlp_cached")
    config = root / "mlp_cached" / "config.yaml"
    config.write_text(
        config.read_text().replace("name: mlp\n", "name: mlp_cached\n")
        + "response_cache: {enable: true}\n"
    )
    shutil.copytree(demo_repo / "resnet", root / "resnet")
    config = root / "resnet" / "config.yaml"
    config.write_text(
        config.read_text().replace(
            "max_queue_delay_us:", "max_queue_size: 1\n  max_queue_delay_us:"
        )
    )
    return root


def query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def load_once(target: str, step: int) -> None:
    """Successes, cache hits and misses, errors and queue rejections."""
    with tc.InferenceServerClient(target) as client:
        for model, value in (("mlp", step), ("mlp_cached", step % 3), ("mlp_cached", 0)):
            x = tc.InferInput("input", [1, 64], "FP32")
            x.set_data_from_numpy(np.full((1, 64), value, np.float32))
            client.infer(model, [x])
        bad = tc.InferInput("input", [1, 63], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 63), np.float32))
        with pytest.raises(tc.InferenceServerException):
            client.infer("mlp", [bad])
        # A burst at resnet (queue of 1, ~10 ms per forward pass) gets some rejected.
        done = threading.Semaphore(0)
        image = tc.InferInput("input", [1, 3, 64, 64], "FP32")
        image.set_data_from_numpy(np.zeros((1, 3, 64, 64), np.float32))
        for _ in range(6):
            client.async_infer("resnet", [image], lambda result, error: done.release())
        for _ in range(6):
            assert done.acquire(timeout=30)


def test_dashboard_and_alert_queries_return_data(tmp_path, repo):
    queries = dashboard_queries() + rule_operands()
    assert len(queries) > 15
    with ServerProcess(repo) as server:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(p) for p in RULES],
                    "scrape_configs": [
                        {
                            "job_name": "salvo",
                            "static_configs": [{"targets": [f"127.0.0.1:{server.http_port}"]}],
                        }
                    ],
                }
            )
        )
        prometheus = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        missing = queries
        try:
            # Keep the load going and re-ask until every query has data: Prometheus needs a
            # few scrapes (about 6 s with a 1 s interval) before rates exist. Each round is
            # real work, so the loop paces itself.
            deadline = time.monotonic() + 90
            step = 0
            while missing and time.monotonic() < deadline:
                load_once(server.grpc_target, step)
                step += 1
                try:
                    missing = [q for q in missing if not query(base, q)]
                except OSError:
                    continue  # Prometheus is still starting
        finally:
            prometheus.terminate()
            prometheus.wait(30)
    assert not missing, missing
