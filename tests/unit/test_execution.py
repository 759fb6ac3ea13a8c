"""Where a model's batches run: `optimization.execution` and the `auto` rule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from salvo.domain.config import (
    ConfigError,
    ModelConfig,
    OptimizationConfig,
    TensorConfig,
    load_config,
)
from salvo.engine.execution import LOOP_MAX_NS, runs_on_loop

CONFIG = ModelConfig(
    name="m",
    max_batch_size=8,
    inputs=(TensorConfig(name="x", datatype="FP32", dims=(4,)),),
    outputs=(TensorConfig(name="y", datatype="FP32", dims=(3,)),),
)


def model(execution="auto", device="cpu", instances=1, largest_batch_ns=LOOP_MAX_NS // 10):
    config = CONFIG.model_copy(
        update={
            "optimization": OptimizationConfig(execution=execution),
            "instance_count": instances,
        }
    )
    return SimpleNamespace(
        config=config, device=torch.device(device), largest_batch_ns=largest_batch_ns
    )


def test_auto_runs_a_fast_cpu_model_with_one_instance_on_the_loop():
    assert runs_on_loop(model())


@pytest.mark.parametrize(
    "why",
    [
        {"largest_batch_ns": LOOP_MAX_NS},  # its largest batch takes the limit or more
        {"largest_batch_ns": None},  # never timed: no warm-up
        {"device": "cuda"},  # waits for its device
        {"instances": 2},  # instances run in parallel on their threads
    ],
)
def test_auto_keeps_every_other_model_on_its_thread(why):
    assert not runs_on_loop(model(**why))


def test_an_explicit_choice_wins():
    assert not runs_on_loop(model("thread"))
    assert runs_on_loop(model("loop", largest_batch_ns=None))


def test_the_loop_takes_one_instance_only(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.yaml").write_text(
        "inputs: [{name: x, datatype: FP32, dims: [4]}]\n"
        "outputs: [{name: y, datatype: FP32, dims: [3]}]\n"
        "instance_count: 2\n"
        "optimization: {execution: loop}\n"
    )
    with pytest.raises(ConfigError, match="instance_count must be 1, got 2"):
        load_config(model_dir)
    (model_dir / "config.yaml").write_text(
        "inputs: [{name: x, datatype: FP32, dims: [4]}]\n"
        "outputs: [{name: y, datatype: FP32, dims: [3]}]\n"
        "optimization: {execution: fast}\n"
    )
    with pytest.raises(ConfigError, match=r"optimization\.execution"):
        load_config(model_dir)
