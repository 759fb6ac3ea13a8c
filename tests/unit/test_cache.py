"""The response cache: keys from domain data, LRU under a byte bound, aliases, kept
encodings, coalescing, and what is never stored."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from salvo.core.cache import (
    ALIAS_OVERHEAD_BYTES,
    ENTRY_OVERHEAD_BYTES,
    FINGERPRINT_SAMPLE_BYTES,
    MAX_ALIASES_PER_ENTRY,
    ResponseCache,
)
from salvo.domain.config import ModelConfig
from salvo.domain.types import Prepared
from salvo.domain.validation import DecodedRequest
from salvo.frontends.grpc.codec import decode_inputs, encode_tensor_typed
from salvo_client.proto import grpc_service_pb2 as pb

CONFIG = ModelConfig(
    name="m",
    max_batch_size=8,
    inputs=[{"name": n, "datatype": "FP32", "dims": [-1]} for n in "ab"],
    outputs=[{"name": n, "datatype": "FP32", "dims": [1]} for n in "xy"],
)


def prepared(model="m", version=1, a=None, b=None, outputs=(0,), parameters=None) -> Prepared:
    a = np.arange(4, dtype=np.float32).reshape(2, 2) if a is None else a
    b = np.ones((2, 2), np.float32) if b is None else b
    return Prepared(model, version, "", (a, b), outputs, a.shape[0], parameters or {})


def key(cache=None, **change):
    return (cache or ResponseCache(1 << 20)).key(prepared(**change))


def outputs(nbytes: int, fill: float = 0.0) -> list[np.ndarray]:
    return [np.full(nbytes // 4, fill, np.float32)]


def test_same_request_same_key():
    assert key() == key()


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"},
        {"version": 2},
        {"outputs": (1,)},
        {"outputs": (0, 1)},
        {"parameters": {"temperature": 1}},
        {"a": np.arange(4, dtype=np.float32).reshape(4, 1)},  # shape
        {"a": np.arange(4, dtype=np.float32).view(np.int32).reshape(2, 2)},  # dtype, same bytes
        {"a": np.arange(1, 5, dtype=np.float32).reshape(2, 2)},  # bytes
        {"a": np.ones((2, 2), np.float32), "b": np.arange(4, dtype=np.float32).reshape(2, 2)},
    ],
)
def test_anything_that_decides_the_answer_changes_the_key(change):
    assert key(**change) != key()


def test_serving_parameters_do_not_change_the_key():
    assert key(parameters={"priority": 1, "timeout": 5, "cache": True}) == key()


def test_a_big_endian_or_strided_array_keys_as_its_little_endian_copy():
    a = np.arange(4, dtype=np.float32).reshape(2, 2)
    assert key(a=a.astype(">f4")) == key(a=a)
    assert key(a=np.asfortranarray(a)) == key(a=a)


def test_raw_and_typed_encodings_and_any_input_order_share_a_key():
    """A request's key comes from what it asks, not from how it was sent."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((3, 4)).astype(np.float32) for _ in range(2))
    raw = pb.ModelInferRequest(model_name="m")
    for name, data in (("a", a), ("b", b)):
        raw.inputs.add(name=name, datatype="FP32", shape=[3, 4])
        raw.raw_input_contents.append(data.tobytes())
    typed = pb.ModelInferRequest(model_name="m")
    for name, data in (("b", b), ("a", a)):
        typed.inputs.add(name=name, datatype="FP32", shape=[3, 4]).contents.CopyFrom(
            encode_tensor_typed("FP32", data)
        )
    cache = ResponseCache(1 << 20)
    keys = {
        cache.key(DecodedRequest("m", decode_inputs(message)).prepare(CONFIG, 1))
        for message in (raw, typed)
    }
    assert len(keys) == 1


def _key_n(cache, n):
    return cache.key(prepared(a=np.full((1, 1), n, np.float32), b=np.ones((1, 1), np.float32)))


def test_lru_evicts_least_recently_used_first_under_a_byte_bound():
    cache = ResponseCache(3 * (100 + ENTRY_OVERHEAD_BYTES))
    keys = [_key_n(cache, i) for i in range(5)]
    for i in range(3):
        cache.put(keys[i], "m", outputs(100, i))
    assert cache.get(keys[0]).arrays[0][0] == 0  # refreshes 0: 1 is now the oldest
    cache.put(keys[3], "m", outputs(100, 3))
    assert [cache.get(k) is not None for k in keys[:4]] == [True, False, True, True]
    # A big entry pushes out as many as it needs, oldest first (2, then 0).
    cache.put(keys[4], "m", outputs(100 + ENTRY_OVERHEAD_BYTES + 100))
    assert cache.get(keys[2]) is None and cache.get(keys[0]) is None
    assert cache.get(keys[3]) is not None and cache.get(keys[4]) is not None
    assert cache.size_bytes <= cache.max_bytes
    assert cache.stats.total.evictions == 3 and cache.stats.total.entries == 2


def test_stored_outputs_are_a_read_only_copy_of_the_batchs():
    batch = np.arange(8, dtype=np.float32).reshape(4, 2)
    cache = ResponseCache(1 << 20)
    entry = cache.put(key(cache), "m", [batch[1:3]])
    batch[:] = -1  # the batch's buffer is reused
    assert entry.arrays[0].tolist() == [[2, 3], [4, 5]]
    assert not entry.arrays[0].flags.writeable and entry.arrays[0].base is None


def test_an_entry_larger_than_the_cache_is_not_stored():
    cache = ResponseCache(100)
    assert cache.put(_key_n(cache, 0), "m", outputs(200)) is None
    assert len(cache) == 0 and cache.size_bytes == 0


def test_a_forced_digest_collision_cannot_return_another_keys_value():
    cache = ResponseCache(1 << 20, digest=lambda parts: b"\0" * 32)
    first, second = _key_n(cache, 1), _key_n(cache, 2)
    assert first.digest == second.digest and first.check != second.check
    cache.put(first, "m", outputs(4, 1.0))
    assert cache.get(second) is None
    assert cache.get(first).arrays[0][0] == 1.0


def test_an_alias_leads_only_to_its_own_transport_models_version_and_entry():
    cache = ResponseCache(1 << 20)
    request = prepared()
    entry = cache.key(request)
    cache.put(entry, "m", outputs(4))
    cache.add_alias("grpc", b"message as sent", entry, request)
    found = cache.lookup_alias("grpc", b"message as sent", "m", 1)
    assert found is not None and found[1].outputs == (0,) and found[1].rows == 2
    assert cache.lookup_alias("http", b"message as sent", "m", 1) is None
    assert cache.lookup_alias("grpc", b"message as sent", "m", 2) is None
    assert cache.lookup_alias("grpc", b"message as sent", "other", 1) is None
    assert cache.lookup_alias("grpc", b"another message", "m", 1) is None
    assert cache.stats.total.hits == 1
    # The entry leaves (evicted, or its model reloaded): its alias goes with it.
    cache.drop_model("m")
    assert cache.lookup_alias("grpc", b"message as sent", "m", 1) is None
    assert len(cache._aliases) == 0
    # An alias is only made for an entry that is there.
    cache.add_alias("grpc", b"message as sent", entry, request)
    assert len(cache._aliases) == 0


def test_a_fingerprint_collision_cannot_return_another_messages_value():
    # Two long messages alike in every sampled byte, different in one byte elsewhere.
    size = 8 * FINGERPRINT_SAMPLE_BYTES
    one = bytearray(size)
    two = bytearray(size)
    two[FINGERPRINT_SAMPLE_BYTES + 7] = 1
    one, two = bytes(one), bytes(two)
    cache = ResponseCache(1 << 20)
    request = prepared()
    entry = cache.key(request)
    cache.put(entry, "m", outputs(4))
    cache.add_alias("grpc", one, entry, request)
    assert cache.lookup_alias("grpc", one, "m", 1) is not None
    assert cache.lookup_alias("grpc", two, "m", 1) is None
    # The second message cannot take the sample: its requests take the full path.
    cache.add_alias("grpc", two, entry, request)
    assert cache.lookup_alias("grpc", two, "m", 1) is None
    assert cache.lookup_alias("grpc", one, "m", 1) is not None


def test_aliases_count_in_the_byte_bound_and_leave_with_their_entry():
    entry_size = 4 + ENTRY_OVERHEAD_BYTES
    alias_size = 100 + ALIAS_OVERHEAD_BYTES
    cache = ResponseCache(2 * entry_size + alias_size)
    first, second = _key_n(cache, 1), _key_n(cache, 2)
    request = prepared()
    cache.put(first, "m", outputs(4))
    cache.put(second, "m", outputs(4))
    cache.add_alias("grpc", b"a" * 100, first, request)  # fits: first is now most recent
    assert cache.size_bytes == 2 * entry_size + alias_size
    assert cache.stats.model("m").bytes == cache.size_bytes
    # An alias that does not fit beside the rest evicts the least recently used entry.
    cache.add_alias("grpc", b"b" * 100, second, request)
    assert cache.get(first) is None and cache.lookup_alias("grpc", b"a" * 100, "m", 1) is None
    assert cache.lookup_alias("grpc", b"b" * 100, "m", 1) is not None
    # Replacing an entry takes its aliases along, and their bytes.
    cache.put(second, "m", outputs(4))
    assert len(cache._aliases) == 0 and cache.size_bytes == entry_size
    # An alias that cannot fit beside its own entry is refused, evicting nothing.
    cache.add_alias("grpc", b"c" * cache.max_bytes, second, request)
    assert len(cache._aliases) == 0 and cache.get(second) is not None


def test_an_entry_takes_a_bounded_number_of_aliases():
    cache = ResponseCache(1 << 20)
    request = prepared()
    entry = cache.key(request)
    cache.put(entry, "m", outputs(4))
    for n in range(MAX_ALIASES_PER_ENTRY + 1):
        cache.add_alias("grpc", bytes([n]), entry, request)
    assert len(cache._aliases) == MAX_ALIASES_PER_ENTRY


def test_drop_model_forgets_only_that_model():
    cache = ResponseCache(1 << 20)
    a, b = key(cache, model="a"), key(cache, model="b")
    cache.put(a, "a", outputs(4, 1.0))
    cache.put(b, "b", outputs(4, 2.0))
    assert cache.drop_model("a") == 1
    assert cache.get(a) is None and cache.get(b).arrays[0][0] == 2.0
    assert cache.stats.model("a").entries == 0 and cache.stats.model("b").entries == 1


Outputs = list[np.ndarray]


def started(body: Callable[[], Awaitable[Outputs]]) -> Callable[[], asyncio.Future[Outputs]]:
    """A compute for get_or_compute: `body` started in a task (a future of its outputs)."""
    return lambda: asyncio.ensure_future(body())


def value(result) -> tuple[float, str]:
    cached, outcome = result
    return float(cached.arrays[0][0]), outcome


async def test_concurrent_misses_compute_once_and_survive_the_first_callers_cancel():
    cache = ResponseCache(1 << 20)
    k = _key_n(cache, 7)
    gate = asyncio.Event()
    calls = 0

    async def compute() -> Outputs:
        nonlocal calls
        calls += 1
        await gate.wait()
        return outputs(4, 42.0)

    first = asyncio.create_task(cache.get_or_compute(k, "m", started(compute)))
    await asyncio.sleep(0)
    others = [asyncio.create_task(cache.get_or_compute(k, "m", started(compute))) for _ in range(4)]
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    results = await asyncio.gather(*others)
    assert [value(r) for r in results] == [(42.0, "coalesced")] * 4
    assert len({id(cached) for cached, _ in results}) == 1  # one entry, shared
    assert calls == 1
    assert first.cancelled()
    assert value(await cache.get_or_compute(k, "m", started(compute))) == (42.0, "hit")
    s = cache.stats.total
    assert (s.misses, s.coalesced, s.hits) == (1, 4, 1)


async def test_a_computation_nobody_waits_for_is_cancelled_and_the_next_caller_starts_afresh():
    cache = ResponseCache(1 << 20)
    k = _key_n(cache, 8)
    gate, running = asyncio.Event(), asyncio.Event()
    ended: list[str] = []
    computations: list[asyncio.Future[Outputs]] = []

    async def body() -> Outputs:
        running.set()
        try:
            await gate.wait()
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise
        ended.append("answered")
        return outputs(4, 1.0)

    def compute() -> asyncio.Future[Outputs]:
        computations.append(asyncio.ensure_future(body()))
        return computations[-1]

    callers = [asyncio.create_task(cache.get_or_compute(k, "m", compute)) for _ in range(2)]
    await running.wait()  # both callers took their first step before the computation did
    assert len(computations) == 1 and cache.stats.total.coalesced == 1
    callers[0].cancel()
    await asyncio.gather(callers[0], return_exceptions=True)
    assert ended == [] and not computations[0].done()  # one caller still waits
    callers[1].cancel()
    await asyncio.gather(callers[1], *computations, return_exceptions=True)
    assert ended == ["cancelled"] and len(cache) == 0
    # A caller after that is not handed the cancelled computation: it starts its own.
    gate.set()
    assert value(await cache.get_or_compute(k, "m", compute)) == (1.0, "miss")
    assert len(computations) == 2 and ended == ["cancelled", "answered"]
    assert cache.get(k) is not None


async def test_a_failure_reaches_every_waiter_and_nothing_is_stored():
    cache = ResponseCache(1 << 20)
    k = _key_n(cache, 3)
    gate = asyncio.Event()

    async def compute() -> Outputs:
        await gate.wait()
        raise RuntimeError("model raised")

    waiters = [
        asyncio.create_task(cache.get_or_compute(k, "m", started(compute))) for _ in range(3)
    ]
    await asyncio.sleep(0)
    gate.set()
    outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert cache.get(k) is None and len(cache) == 0


async def test_a_reload_during_a_computation_does_not_store_the_old_answer():
    cache = ResponseCache(1 << 20)
    k = _key_n(cache, 4)
    gate = asyncio.Event()

    async def compute() -> Outputs:
        await gate.wait()
        return outputs(4, 9.0)

    waiter = asyncio.create_task(cache.get_or_compute(k, "m", started(compute)))
    await asyncio.sleep(0)
    cache.drop_model("m")
    gate.set()
    cached, outcome = await waiter
    assert cached.arrays[0][0] == 9.0 and outcome == "miss"
    assert cache.get(k) is None


async def test_a_caller_that_joins_as_the_computation_ends_gets_its_answer():
    """The computation's future is done, but its done-callback (which stores the answer)
    has not run yet: a caller in that same turn of the loop finds the flight, and a done
    future, and must still get the answer, stored once."""
    cache = ResponseCache(1 << 20)
    k = _key_n(cache, 5)
    loop = asyncio.get_running_loop()
    computed: asyncio.Future[Outputs] = loop.create_future()
    first = asyncio.create_task(cache.get_or_compute(k, "m", lambda: computed))
    await asyncio.sleep(0)  # the first caller waits on the computation

    def never() -> asyncio.Future[Outputs]:
        raise AssertionError("a second computation")

    # Queued in this order: the result, then the joining caller's first step, then (queued
    # by set_result) the callback that stores the answer.
    loop.call_soon(computed.set_result, outputs(4, 3.0))
    joined = asyncio.create_task(cache.get_or_compute(k, "m", never))
    assert value(await joined) == (3.0, "coalesced")
    assert value(await first) == (3.0, "miss")
    assert len(cache) == 1 and cache.get(k).arrays[0][0] == 3.0
