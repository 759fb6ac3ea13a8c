"""The response cache through a real server and tritonclient: hits skip the model, identical
requests in flight run once, bypass and reload work, failures are never cached."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as tc

from tests.gated import POISON, GatedLoader, write_model
from tests.servers import InProcessServer

CONFIG = """max_batch_size: 8
inputs: [{name: x, datatype: FP32, dims: [-1]}]
outputs: [{name: y, datatype: FP32, dims: [-1]}]
dynamic_batching: {max_queue_delay_us: 100}
response_cache: {enable: true}
"""


@pytest.fixture()
def loader():
    return GatedLoader()


@pytest.fixture()
def server(tmp_path, loader):
    write_model(tmp_path, "cached", CONFIG)
    write_model(tmp_path, "uncached", CONFIG.replace("enable: true", "enable: false"))
    with InProcessServer(tmp_path, loader, cache_max_bytes=1 << 20) as server:
        yield server


@pytest.fixture()
def client(server):
    with tc.InferenceServerClient(server.grpc_target) as c:
        yield c


def x_input(value: float, width: int = 3) -> tc.InferInput:
    x = tc.InferInput("x", [1, width], "FP32")
    x.set_data_from_numpy(np.full((1, width), value, np.float32))
    return x


def cache_stats(client, model="cached"):
    s = client.get_inference_statistics(model).model_stats[0].inference_stats
    return s.cache_hit.count, s.cache_miss.count


def test_a_repeated_request_is_answered_from_the_cache(server, client, loader):
    first = client.infer("cached", [x_input(1.5)], request_id="a")
    second = client.infer("cached", [x_input(1.5)], request_id="b")
    assert second.get_response().id == "b"  # the caller's id, not the cached one
    np.testing.assert_array_equal(second.as_numpy("y"), first.as_numpy("y"))
    np.testing.assert_array_equal(second.as_numpy("y"), np.full((1, 3), 3.0, np.float32))
    assert len(loader.modules["cached"].batches) == 1  # the model ran once
    assert cache_stats(client) == (1, 1)
    # A different input, shape or output set is a different entry.
    client.infer("cached", [x_input(1.5, width=4)])
    client.infer("cached", [x_input(2.5)])
    assert len(loader.modules["cached"].batches) == 3
    stats = server.server.cache.stats.model("cached")
    assert (stats.hits, stats.misses, stats.entries) == (1, 3, 3)


def test_a_message_answered_before_is_answered_again_through_its_alias(server, client, loader):
    cache = server.server.cache
    answers = [client.infer("cached", [x_input(4.5)], request_id=rid) for rid in "abcd"]
    # The second request was a hit on the key and left an alias; the third and fourth
    # were answered through it: same answer, the caller's own id, counted as hits.
    assert [a.get_response().id for a in answers] == list("abcd")
    for answer in answers:
        np.testing.assert_array_equal(answer.as_numpy("y"), np.full((1, 3), 9.0, np.float32))
    assert len(loader.modules["cached"].batches) == 1
    assert cache_stats(client) == (3, 1)
    assert len(cache._aliases) == 1
    # Asking for the output by name is another message (and another key): no alias.
    named = client.infer("cached", [x_input(4.5)], outputs=[tc.InferRequestedOutput("y")])
    np.testing.assert_array_equal(named.as_numpy("y"), np.full((1, 3), 9.0, np.float32))
    # Parameters keep a request off the aliases, so a bypass still runs the model.
    ran = len(loader.modules["cached"].batches)
    client.infer("cached", [x_input(4.5)], parameters={"cache": False})
    assert len(loader.modules["cached"].batches) == ran + 1
    # A reload drops the aliases with the entries: the model runs again.
    client.load_model("cached")
    assert len(cache._aliases) == 0
    again = client.infer("cached", [x_input(4.5)], request_id="e")
    assert again.get_response().id == "e"
    assert len(loader.modules["cached"].batches) == ran + 2


def test_a_model_without_the_cache_runs_every_time(client, loader):
    for _ in range(2):
        client.infer("uncached", [x_input(1.0)])
    assert len(loader.modules["uncached"].batches) == 2
    assert cache_stats(client, "uncached") == (0, 0)


def test_identical_requests_in_flight_run_once_and_survive_the_first_cancel(server, client, loader):
    model = loader.modules["cached"]
    model.hold()
    answers: queue.Queue = queue.Queue()

    def send(tag: str):
        return client.async_infer(
            "cached",
            [x_input(4.0)],
            lambda result, error: answers.put((tag, result, error)),
            request_id=tag,
        )

    first = send("first")
    model.wait_batches(1)  # the first is running and held
    for i in range(4):
        send(f"w{i}")
    cache = server.server.cache
    server.until(lambda: cache.stats.total.coalesced == 4)
    first.cancel()
    assert answers.get(timeout=30)[2].status() == "StatusCode.CANCELLED"
    model.open()
    rest = [answers.get(timeout=30) for _ in range(4)]
    for tag, result, error in rest:
        assert error is None, error
        assert result.get_response().id == tag
        np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 3), 8.0, np.float32))
    assert len(model.batches) == 1
    # ModelStatistics counts the cache outcome of answered requests: the four coalesced
    # ones as hits; the cancelled first one was never answered. The cache saw its miss.
    assert cache_stats(client) == (4, 0)
    assert (cache.stats.total.misses, cache.stats.total.coalesced) == (1, 4)
    client.infer("cached", [x_input(4.0)])  # and the result was stored
    assert len(model.batches) == 1


def test_a_request_every_caller_left_never_runs(server, client, loader):
    model = loader.modules["cached"]
    model.hold()
    answers: queue.Queue = queue.Queue()
    client.async_infer(
        "cached", [x_input(10.0)], lambda result, error: answers.put(("held", result, error))
    )
    model.wait_batches(1)  # running and held: the model's one instance is busy
    left = client.async_infer(
        "cached", [x_input(11.0)], lambda result, error: answers.put(("left", result, error))
    )
    server.wait_queued("cached", 1)
    left.cancel()
    tag, _, error = answers.get(timeout=30)
    assert tag == "left" and error.status() == "StatusCode.CANCELLED"
    server.wait_queued("cached", 0)  # withdrawn: its only caller left
    model.open()
    tag, result, error = answers.get(timeout=30)
    assert tag == "held" and error is None
    assert len(model.batches) == 1  # the abandoned request never ran
    assert server.server.cache.stats.model("cached").entries == 1
    # Asked again, it is computed afresh and answered.
    again = client.infer("cached", [x_input(11.0)])
    np.testing.assert_array_equal(again.as_numpy("y"), np.full((1, 3), 22.0, np.float32))
    assert len(model.batches) == 2


def test_bypass_runs_the_model_and_stores_nothing(client, loader):
    client.infer("cached", [x_input(6.0)])
    client.infer("cached", [x_input(6.0)], parameters={"cache": False})
    client.infer("cached", [x_input(7.0)], parameters={"cache": "bypass"})
    assert len(loader.modules["cached"].batches) == 3
    client.infer("cached", [x_input(7.0)])  # the bypassed answer was not stored
    assert len(loader.modules["cached"].batches) == 4


def test_a_reload_invalidates_the_models_entries(server, client, loader):
    client.infer("cached", [x_input(9.0)])
    client.infer("cached", [x_input(9.0)])
    assert len(loader.modules["cached"].batches) == 1
    client.load_model("cached")
    assert server.server.cache.stats.model("cached").entries == 0
    client.infer("cached", [x_input(9.0)])
    assert len(loader.modules["cached"].batches) == 2
    client.unload_model("cached")
    client.load_model("cached")
    client.infer("cached", [x_input(9.0)])
    assert len(loader.modules["cached"].batches) == 3


def test_failures_are_never_cached(client, loader):
    for _ in range(2):
        with pytest.raises(tc.InferenceServerException) as info:
            client.infer("cached", [x_input(POISON)])
        assert info.value.status() == "StatusCode.INTERNAL"
    assert len(loader.modules["cached"].batches) == 2
    with pytest.raises(tc.InferenceServerException) as info:
        client.infer("cached", [x_input(1.0, width=9)], outputs=[tc.InferRequestedOutput("z")])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
