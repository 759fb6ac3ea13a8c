"""`salvo batch`'s command line and model description, without a server: usage errors exit 2
before anything is sent, batch sizes follow the model, metadata becomes a ModelSpec."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest

from salvo.cli import build_parser as salvo_parser
from salvo_client.batch import EXIT_USAGE, BatchError, build_parser
from salvo_client.batch.job import batch_size_for
from salvo_client.batch.model import ModelSpec, TensorSpec, model_spec
from salvo_client.batch.progress import Counts, make_progress, summary
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import model_config_pb2 as mc


def run(argv: list[str], local_server=None) -> int:
    args = build_parser(local_server).parse_args(argv)
    return int(args.func(args))


@pytest.fixture()
def x(tmp_path: Path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 4), np.float32))
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give --url HOST:PORT of a running server, or --model-repository DIR"),
        (["--url", "h:1", "--model-repository", "."], "--url or --model-repository, not both"),
        (["--model-repository", "."], "pip install 'salvo[server]'"),
        (["--url", "h:1", "--retries", "-1"], "retries must be >= 0"),
        (["--url", "h:1", "--backoff-s", "0"], "need 0 < initial_s <= max_s"),
        (["--url", "h:1", "--max-backoff-s", "0.1"], "need 0 < initial_s <= max_s"),
        (["--url", "h:1", "--timeout-s", "0"], "--timeout-s must be positive"),
        (["--url", "h:1", "--input", "nonsense"], "expected NAME=SPEC"),
        (["--url", "h:1", "--outputs", ","], "name at least one output"),
    ],
)
def test_usage_errors_exit_2_with_a_message(x: Path, capsys, extra: list[str], message: str):
    assert run(["mlp", str(x), *extra]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_local_server_takes_no_tls_and_needs_a_folder(x: Path, tmp_path: Path, capsys):
    started: list[Path] = []

    @contextlib.contextmanager
    def local_server(repository: Path):
        started.append(repository)
        yield "unused:0"

    assert run(["mlp", str(x), "--model-repository", str(tmp_path / "no")], local_server) == 2
    assert "no such directory" in capsys.readouterr().err
    assert run(["mlp", str(x), "--model-repository", str(tmp_path), "--tls"], local_server) == 2
    assert "apply to --url" in capsys.readouterr().err
    assert started == []


def test_salvo_registers_batch_with_its_local_server():
    args = salvo_parser().parse_args(["batch", "mlp", "x.npy", "--concurrency", "8"])
    assert args.command == "batch" and args.concurrency == 8 and callable(args.func)
    with pytest.raises(SystemExit):
        salvo_parser().parse_args(["batch", "mlp", "x.npy", "--concurrency", "0"])


def spec(max_batch_size: int) -> ModelSpec:
    return ModelSpec("m", ("1",), max_batch_size, (TensorSpec("x", "FP32", (4,)),), ())


def test_batch_sizes_follow_the_model():
    assert batch_size_for(spec(128), None) == 64
    assert batch_size_for(spec(8), None) == 8
    assert batch_size_for(spec(8), 3) == 3
    assert batch_size_for(spec(0), None) == 1
    with pytest.raises(BatchError, match="takes 1 to 8 rows"):
        batch_size_for(spec(8), 9)
    with pytest.raises(BatchError, match="does not batch"):
        batch_size_for(spec(0), 2)


def test_metadata_and_config_make_the_spec():
    metadata = pb.ModelMetadataResponse(name="digits", versions=["1", "2"])
    metadata.inputs.add(name="image", datatype="FP32", shape=[-1, 8, 8])
    metadata.outputs.add(name="label", datatype="INT64", shape=[-1, 1])
    config = mc.ModelConfig(name="digits", max_batch_size=64)
    config.parameters["image.layout"].string_value = "HW"
    made = model_spec(metadata, config)
    assert made.batches and made.versions == ("1", "2")
    assert made.inputs == (TensorSpec("image", "FP32", (8, 8)),)
    assert made.outputs == (TensorSpec("label", "INT64", (1,)),)
    assert made.parameters == {"image.layout": "HW"}
    assert made.select_outputs(["label"]) == made.outputs
    with pytest.raises(BatchError, match="no output 'nope'"):
        made.select_outputs(["nope"])

    unbatched = model_spec(metadata, mc.ModelConfig(name="digits", max_batch_size=0))
    assert unbatched.inputs[0].dims == (-1, 8, 8)
    metadata.inputs.add(name="half", datatype="BF16", shape=[-1, 2])
    with pytest.raises(BatchError, match="BF16"):
        model_spec(metadata, config)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_progress_bar_and_anything_else_lines():
    terminal = Terminal()
    bar = make_progress(True, terminal)
    bar.start(total=100, done=40)
    bar.advance(10)
    bar.note("UNAVAILABLE: retrying")
    bar.close()
    shown = terminal.getvalue()
    assert "50/100" in shown and "rows/s" in shown and "ETA" in shown
    assert "salvo batch: UNAVAILABLE: retrying" in shown

    for enabled, stream in ((False, Terminal()), (True, io.StringIO())):
        plain = make_progress(enabled, stream)
        plain.start(total=100, done=0)
        plain.advance(100)
        plain.note("a note")
        plain.close()
        assert stream.getvalue() == "salvo batch: a note\n"


def test_without_rich_there_is_no_bar_and_a_note_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "rich.progress", None)
    terminal = Terminal()
    progress = make_progress(True, terminal)
    progress.note("still here")
    assert terminal.getvalue() == (
        "salvo batch: no progress bar without rich: pip install 'salvo[batch]'\n"
        "salvo batch: still here\n"
    )


def test_the_summary_says_where_the_output_went_or_how_to_resume(tmp_path: Path):
    counts = Counts(scored=90, errors=2)
    common = {"counts": counts, "skipped": 8, "elapsed_s": 2.0, "retries": 3, "total": 100,
              "journal": tmp_path / "o.npz.partial"}  # fmt: skip
    done = summary(**common, errors_total=2, output=tmp_path / "o.npz", stopped=None)
    assert done[0] == (
        "salvo batch: rows scored 90, with errors 2, skipped (journalled before) 8; "
        "2.00 s, 46 rows/s; retries 3"
    )
    assert done[1] == f"salvo batch: output: {tmp_path / 'o.npz'} (100 rows, 2 with errors)"
    stopped = summary(**common, errors_total=0, output=None, stopped="interrupted (SIGINT)")
    assert stopped[1].startswith("salvo batch: stopped: interrupted (SIGINT); 100 of 100 rows")
    assert stopped[1].endswith("rerun the same command to resume")
