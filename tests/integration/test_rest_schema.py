"""The REST API against its own OpenAPI document: schemathesis makes requests from each
route's schema (its examples, the boundaries of every field, then random ones, valid and
not), and every answer must be no server error, a status the document lists, of the
content type and schema it gives for that status (`{"error": ...}` with a message for
every failure), and a refusal wherever the request broke the schema. Then the server must
still answer a real client.

The server is its own, on a copy of two demo models.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as thttp

from tests.servers import InProcessServer

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
)


@pytest.fixture(scope="module")
def server(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("schema-repo")
    for model in ("mlp", "digits"):
        shutil.copytree(demo_repo / model, root / model)
    with InProcessServer(root, repository_rpcs="enabled") as running:
        yield running


def test_every_answer_follows_the_document(server, tmp_path) -> None:
    """schemathesis's own command line, run to the end: every phase that needs no links
    between routes, a fixed seed so that a failure replays."""
    base = f"http://127.0.0.1:{server.server.http_port}"
    run = subprocess.run(
        [
            str(Path(sys.executable).with_name("st")), "run", f"{base}/v2/docs/openapi.json",
            "--checks", ",".join(CHECKS), "--phases", "examples,coverage,fuzzing",
            "--max-examples", "100", "--seed", "1", "--workers", "1", "--no-color",
            "--suppress-health-check", "all", "--report-dir", str(tmp_path),
            # Loads and unloads are left out: a model the fuzzer unloaded answers 503, a
            # server error by the checks' rule (test_rest.py covers both routes).
            "--exclude-path-regex", "^/v2/repository/models/",
        ],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-4000:]
    assert "passed" in run.stdout, run.stdout[-4000:]


def test_the_server_still_serves_after_the_fuzzing(server) -> None:
    client = thttp.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
    try:
        client.load_model("mlp")  # the fuzzer may have unloaded it
        x = np.full((2, 64), 0.25, np.float32)
        request = thttp.InferInput("input", list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        answer = client.infer("mlp", [request]).as_numpy("output")
    finally:
        client.close()
    assert answer is not None and answer.shape == (2, 10) and np.isfinite(answer).all()
