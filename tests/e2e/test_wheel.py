"""The images' build steps, run without Docker.

The build context is what .dockerignore lets through; the builder stage's COPY lines pick the
sources from it; the wheel is built from exactly those with the builder's commands and
installed into a clean virtualenv in the runtime stage's order (torch, the exported
requirements, the wheel with --no-deps, pip check). `salvo serve` then starts from that venv
with the image's ENV defaults, the image's HEALTHCHECK script reports it healthy, and it
answers tritonclient. What stays unexercised: the base images and the CUDA build of torch.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.servers import LISTENING

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"


# --- the build context: .dockerignore, as Docker reads it ------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (Go's filepath.Match, plus `**` for any depth)."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception `!`, regex) per pattern, in order."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rules.append((exception, _pattern_regex(pattern)))
    return rules


def _in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker sends `path` to the builder: the last pattern matching it, or one of
    its parent folders, decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for exception, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not exception
    return not excluded


def _context_files() -> set[str]:
    """The repository's files (tracked, or new and not git-ignored) that reach the builder."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    rules = _dockerignore()
    return {
        path for path in listed.split("\0") if path and (ROOT / path).is_file()
        if _in_context(path, rules)
    }  # fmt: skip


# --- the Dockerfile's stages -----------------------------------------------------------


def _stage(name: str) -> list[tuple[str, str]]:
    """The instructions of one stage of the CPU Dockerfile (continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stage: list[tuple[str, str]] | None = None
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword == "FROM":
            if stage is not None:
                return stage
            if rest.endswith(f" AS {name}"):
                stage = []
        elif stage is not None:
            stage.append((keyword, rest))
    if stage is None:
        raise AssertionError(f"no stage {name} in {DOCKERFILE.name}")
    return stage


def _copy(stage: list[tuple[str, str]], files: set[str], dest_root: Path) -> None:
    """Carry out the stage's COPY lines from the build context (WORKDIR = dest_root)."""
    for keyword, args in stage:
        if keyword != "COPY" or args.startswith("--from"):
            continue
        *sources, dest = args.split()
        for source in sources:
            if source.endswith("/"):
                under = [f for f in files if f.startswith(source)]
                assert under, f"COPY {source}: nothing of it is in the build context"
                for f in under:
                    target = dest_root / dest / f[len(source) :]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / f, target)
            else:
                assert source in files, f"COPY {source}: not in the build context"
                target = dest_root / dest
                if dest.endswith("/"):
                    target = target / Path(source).name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / source, target)


def _run_lines(stage: list[tuple[str, str]]) -> str:
    return "\n".join(args for keyword, args in stage if keyword == "RUN")


def _image_env() -> dict[str, str]:
    env_lines = " ".join(args for keyword, args in _stage("runtime") if keyword == "ENV")
    return dict(re.findall(r"(SALVO_\w+)=(\S+)", env_lines))


# --- tests -----------------------------------------------------------------------------


def test_build_context_holds_what_the_dockerfiles_copy_and_nothing_heavy() -> None:
    files = _context_files()
    rules = _dockerignore()
    for heavy in (".venv/bin/python", "build/model-repo/mlp/config.yaml", ".git/HEAD"):
        assert not _in_context(heavy, rules), heavy
    for cached in ("server/salvo/__pycache__/cli.cpython-311.pyc", "salvo.egg-info/PKG-INFO"):
        assert not _in_context(cached, rules), cached
    assert not any(f.startswith("tests/") for f in files)
    for dockerfile in (DOCKERFILE, ROOT / "Dockerfile.gpu"):
        sources = re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile.read_text(), re.M)
        for source in " ".join(sources).split():
            assert source in files or any(f.startswith(source) for f in files), source


def _pip(venv: Path, *args: str, cwd: Path) -> None:
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment less anything pointing at the project's own venv or sources."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **extra}


def _healthcheck(venv: Path, target: str) -> subprocess.CompletedProcess:
    # As the image runs it: the runtime's python, the script on its own.
    return subprocess.run(
        [str(venv / "bin" / "python"), str(HEALTHCHECK), target],
        capture_output=True,
        text=True,
        timeout=30,
        env=_clean_env(),
    )


@pytest.mark.timeout(420)
def test_wheel_from_the_builder_stage_serves_from_a_clean_venv(tmp_path: Path) -> None:
    files = _context_files()

    # requirements stage: the lists exported from pyproject.toml.
    requirements_stage = _stage("requirements")
    assert "python requirements.py pyproject.toml /requirements" in _run_lines(requirements_stage)
    exported = tmp_path / "requirements"
    work = tmp_path / "requirements-src"
    _copy(requirements_stage, files, work)
    subprocess.run(
        [sys.executable, "requirements.py", "pyproject.toml", str(exported)], cwd=work, check=True
    )

    # builder stage: the stubs regenerated from proto/, then the wheel, from the COPY'd
    # sources only (so a file the wheel needs but the Dockerfile does not copy fails here).
    builder = _stage("builder")
    src = tmp_path / "src"
    _copy(builder, files, src)
    commands = _run_lines(builder)
    assert "python tools/gen_protos.py" in commands
    assert "pip wheel --no-cache-dir --no-deps --no-build-isolation -w /dist ." in commands
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "tools/gen_protos.py"], cwd=src, check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(dist), "."],
        cwd=src, check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = dist.glob("salvo-*.whl")
    with zipfile.ZipFile(wheel) as built:  # the docs' Swagger UI, served from the package
        assert "salvo/frontends/http/swagger-ui/swagger-ui-bundle.js" in built.namelist()

    # runtime stage, in its order: torch (the build these tests run on, so pip takes it from
    # the local cache or index), the exported requirements, the wheel alone, pip check.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _pip(venv, f"torch=={importlib.metadata.version('torch')}", cwd=tmp_path)
    _pip(venv, "-r", str(exported / "runtime.txt"), cwd=tmp_path)
    _pip(venv, "--no-deps", str(wheel), cwd=tmp_path)
    check = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr

    repo = tmp_path / "models"
    subprocess.run(
        [str(venv / "bin" / "salvo"), "demo-repo", str(repo)],
        cwd=tmp_path, env=_clean_env(), check=True, capture_output=True, timeout=180,
    )  # fmt: skip

    # The image's ENV defaults, but loopback, ports picked by the OS, and this repository.
    env = _clean_env(**_image_env())
    env.update(SALVO_HOST="127.0.0.1", SALVO_GRPC_PORT="0", SALVO_HTTP_PORT="0")
    env.update(SALVO_MODEL_REPOSITORY=str(repo), SALVO_TORCH_THREADS="1")
    server = subprocess.Popen(
        [str(venv / "bin" / "salvo"), "serve"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log: list[str] = []
    try:
        assert server.stdout is not None
        for line in server.stdout:
            log.append(line)
            if match := LISTENING.search(line):
                target = f"127.0.0.1:{match.group(2)}"
                break
        else:
            raise AssertionError("salvo serve exited:\n" + "".join(log))
        # Keep reading, so the server never blocks on a full pipe.
        drain = threading.Thread(target=lambda: log.extend(server.stdout), daemon=True)
        drain.start()
        # Bound to the module the wheel installed, not the source tree.
        assert str(venv) in subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import salvo; print(salvo.__file__)"],
            cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip

        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for response in stub.Watch(health_pb2.HealthCheckRequest(), timeout=120):
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    break
        healthy = _healthcheck(venv, target)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert "SERVING" in healthy.stdout

        with tc.InferenceServerClient(target) as client:
            x = tc.InferInput("input", [2, 64], "FP32")
            x.set_data_from_numpy(np.ones((2, 64), dtype=np.float32))
            result = client.infer("mlp", [x], client_timeout=30)
            assert result.as_numpy("output").shape == (2, 10)
            assert np.isfinite(result.as_numpy("output")).all()

        # docker stop: SIGTERM (the image's STOPSIGNAL), and the server drains and exits 0.
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, "".join(log)
        gone = _healthcheck(venv, target)
        assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr, gone.stderr
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
