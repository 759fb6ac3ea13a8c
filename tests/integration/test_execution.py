"""Where batches run (`optimization.execution`), checked on a real in-process server: the
thread each forward pass ran on is recorded by the model itself."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from salvo.engine import execution as execution_module
from tests.gated import POISON, GatedLoader, serving
from tests.servers import InProcessServer


def config(execution: str | None) -> str:
    text = (
        "max_batch_size: 8\n"
        "inputs: [{name: x, datatype: FP32, dims: [1]}]\n"
        "outputs: [{name: y, datatype: FP32, dims: [1]}]\n"
        "dynamic_batching: {max_queue_delay_us: 100}\n"
    )
    return text + (f"optimization: {{execution: {execution}}}\n" if execution else "")


MODELS = {"on_loop": config("loop"), "on_thread": config("thread"), "auto": config(None)}


@pytest.fixture(scope="module")
def loader():
    return GatedLoader()


@pytest.fixture(scope="module")
def server(tmp_path_factory, loader):
    with serving(tmp_path_factory.mktemp("execution-repo"), loader, MODELS) as server:
        yield server


@pytest.fixture()
def client(server):
    with tc.InferenceServerClient(server.grpc_target) as c:
        yield c


def infer(client, model: str, value: float) -> np.ndarray:
    x = tc.InferInput("x", [1, 1], "FP32")
    x.set_data_from_numpy(np.full((1, 1), value, np.float32))
    return client.infer(model, [x]).as_numpy("y")


def test_loop_runs_batches_on_the_event_loop_thread(server, client, loader):
    assert server.scheduler("on_loop").on_loop
    for value in (1.0, 2.0, 3.0):
        np.testing.assert_array_equal(infer(client, "on_loop", value), [[2 * value]])
    assert set(loader.modules["on_loop"].threads) == {server._thread.ident}


def test_thread_runs_batches_on_the_instance_thread(server, client, loader):
    assert not server.scheduler("on_thread").on_loop
    np.testing.assert_array_equal(infer(client, "on_thread", 4.0), [[8.0]])
    (ran_on,) = set(loader.modules["on_thread"].threads)
    assert ran_on != server._thread.ident
    executor = server.scheduler("on_thread")._executors[0]
    assert executor.submit(lambda: __import__("threading").get_ident()).result(10) == ran_on


def test_auto_without_a_warm_up_timing_stays_on_its_thread(server, client, loader):
    # The gated loader builds models without loading a file, so nothing was timed.
    assert server.scheduler("auto").model.largest_batch_ns is None
    assert not server.scheduler("auto").on_loop
    infer(client, "auto", 1.0)
    assert server._thread.ident not in loader.modules["auto"].threads


def test_an_auto_model_whose_batches_turn_slow_moves_to_its_thread(
    server, client, loader, monkeypatch, caplog
):
    scheduler = server.scheduler("auto")
    module = loader.modules["auto"]
    monkeypatch.setattr(execution_module, "LOOP_GUARD_NS", -1)  # every batch counts as slow
    monkeypatch.setattr(execution_module, "LOOP_GUARD_SPAN_NS", 0)  # however short the run
    server.call(_put_on_loop(scheduler))
    with caplog.at_level(logging.WARNING, logger="salvo.engine.scheduler"):
        before = len(module.threads)
        for value in range(execution_module.LOOP_GUARD_BATCHES):
            assert scheduler.on_loop  # one slow batch is a hiccup, not a reason to move
            infer(client, "auto", float(value))
        assert not scheduler.on_loop
        infer(client, "auto", 9.0)  # the next batch runs on the model's thread
    ran = module.threads[before:]
    assert ran[:-1] == [server._thread.ident] * execution_module.LOOP_GUARD_BATCHES
    assert ran[-1] != server._thread.ident
    assert any("run on its own thread from now on" in r.getMessage() for r in caplog.records)


def test_only_slow_batches_in_a_row_move_a_model_failed_ones_included(
    server, client, loader, monkeypatch
):
    scheduler = server.scheduler("auto")
    module = loader.modules["auto"]
    server.call(_put_on_loop(scheduler))
    monkeypatch.setattr(execution_module, "LOOP_GUARD_SPAN_NS", 0)
    slow, fast = -1, 10**12  # LOOP_GUARD_NS that makes every batch slow, or none
    for guard_ns in (slow, slow, fast, slow, slow):  # a fast batch restarts the count
        monkeypatch.setattr(execution_module, "LOOP_GUARD_NS", guard_ns)
        infer(client, "auto", 1.0)
        assert scheduler.on_loop
    x = tc.InferInput("x", [1, 1], "FP32")
    x.set_data_from_numpy(np.full((1, 1), POISON, np.float32))
    with pytest.raises(InferenceServerException) as info:  # a failed batch counts too
        client.infer("auto", [x])
    assert info.value.status() == "StatusCode.INTERNAL"
    assert not scheduler.on_loop
    before = len(module.threads)
    np.testing.assert_array_equal(infer(client, "auto", 5.0), [[10.0]])  # and it serves on
    assert module.threads[before] != server._thread.ident


def test_a_short_run_of_slow_batches_is_a_hiccup_and_the_model_stays(
    server, client, loader, monkeypatch
):
    """Slow batches in a row move a model only once they have lasted LOOP_GUARD_SPAN_NS:
    a machine that stalls for a few ms slows every batch of that moment, whatever the
    model."""
    scheduler = server.scheduler("auto")
    module = loader.modules["auto"]
    server.call(_put_on_loop(scheduler))
    monkeypatch.setattr(execution_module, "LOOP_GUARD_NS", -1)  # every batch counts as slow
    monkeypatch.setattr(execution_module, "LOOP_GUARD_SPAN_NS", 10**15)  # a run this short
    before = len(module.threads)
    for value in range(execution_module.LOOP_GUARD_BATCHES + 2):
        infer(client, "auto", float(value))
        assert scheduler.on_loop
    assert module.threads[before:] == [server._thread.ident] * (
        execution_module.LOOP_GUARD_BATCHES + 2
    )
    monkeypatch.setattr(execution_module, "LOOP_GUARD_SPAN_NS", 0)  # the same run, long enough
    infer(client, "auto", 1.0)
    assert not scheduler.on_loop


async def _put_on_loop(scheduler) -> None:
    scheduler.on_loop = True  # as `auto` decides for a model timed fast at warm-up
    scheduler._guard.slow = 0  # and with no slow batch seen yet


def test_the_demo_mlp_runs_on_the_loop_and_resnet_on_its_thread(demo_repo: Path, tmp_path):
    for name in ("mlp", "resnet"):
        shutil.copytree(demo_repo / name, tmp_path / name)
    with InProcessServer(tmp_path) as server:
        mlp, resnet = server.scheduler("mlp"), server.scheduler("resnet")
        assert mlp.model.largest_batch_ns < execution_module.LOOP_MAX_NS and mlp.on_loop
        assert resnet.model.largest_batch_ns > execution_module.LOOP_MAX_NS
        assert not resnet.on_loop


@pytest.mark.parametrize("model", ["on_loop", "on_thread"])
def test_a_bug_in_a_batch_bookkeeping_fails_that_batch_only(server, client, model, monkeypatch):
    """Our own error after the forward pass (statistics, here) answers the batch INTERNAL;
    the dispatcher and the instance carry on."""
    stats_type = type(server.scheduler(model).stats)  # slotted: patched on its class
    record_batch = stats_type.record_batch

    def broken(*args, **kwargs):
        monkeypatch.setattr(stats_type, "record_batch", record_batch)  # once
        raise RuntimeError("bookkeeping bug")

    monkeypatch.setattr(stats_type, "record_batch", broken)
    with pytest.raises(InferenceServerException) as info:
        infer(client, model, 1.0)
    assert info.value.status() == "StatusCode.INTERNAL"
    np.testing.assert_array_equal(infer(client, model, 2.0), [[4.0]])
    scheduler = server.scheduler(model)
    assert not scheduler._task.done() and scheduler.in_flight == 0
