"""The response cache: keys, LRU under a byte bound, coalescing, and what is never stored."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from salvo.cache import (
    ALIAS_OVERHEAD_BYTES,
    ENTRY_OVERHEAD_BYTES,
    FINGERPRINT_SAMPLE_BYTES,
    MAX_ALIASES_PER_ENTRY,
    ResponseCache,
)
from salvo.codec import Tensor, decode_inputs, encode_tensor_typed
from salvo_client.proto import grpc_service_pb2 as pb


def tensor(name="x", datatype="FP32", data=None, shape=None):
    data = np.arange(4, dtype=np.float32).reshape(2, 2) if data is None else data
    return Tensor(name, datatype, tuple(shape or data.shape), data)


def key(cache=None, model="m", version=1, tensors=None, outputs=(), parameters=None):
    cache = cache or ResponseCache(1 << 20)
    return cache.key(model, version, tensors or [tensor()], list(outputs), parameters or {})


def test_same_request_same_key():
    assert key() == key()


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"},
        {"version": 2},
        {"outputs": ("y",)},
        {"parameters": {"temperature": 1}},
        {"tensors": [tensor(data=np.arange(4, dtype=np.float32).reshape(4, 1))]},  # shape
        {
            "tensors": [
                tensor(
                    datatype="INT32",
                    data=np.arange(4, dtype=np.float32).view(np.int32).reshape(2, 2),
                )
            ]
        },
        {"tensors": [tensor(data=np.arange(1, 5, dtype=np.float32).reshape(2, 2))]},  # bytes
        {"tensors": [tensor(name="z")]},
    ],
)
def test_anything_that_decides_the_answer_changes_the_key(change):
    assert key(**change) != key()


def test_serving_parameters_and_input_order_do_not_change_the_key():
    a, b = tensor("a"), tensor("b", data=np.ones((2, 2), np.float32))
    base = key(tensors=[a, b])
    assert key(tensors=[b, a]) == base
    assert key(tensors=[a, b], parameters={"priority": 1, "timeout": 5, "cache": True}) == base


def test_raw_and_typed_encodings_share_a_key():
    data = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    raw = pb.ModelInferRequest(model_name="m")
    raw.inputs.add(name="x", datatype="FP32", shape=[3, 4])
    raw.raw_input_contents.append(data.tobytes())
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="FP32", shape=[3, 4]).contents.CopyFrom(
        encode_tensor_typed("FP32", data)
    )
    assert key(tensors=decode_inputs(raw)) == key(tensors=decode_inputs(typed))


def test_bytes_and_scalar_tensors_have_keys():
    words = np.array([b"a", b"bc"], dtype=object)
    assert key(tensors=[tensor(datatype="BYTES", data=words)]) != key(
        tensors=[tensor(datatype="BYTES", data=np.array([b"ab", b"c"], dtype=object))]
    )
    scalar = np.array(1.5, dtype=np.float32)
    assert key(tensors=[tensor(data=scalar, shape=())]) == key(
        tensors=[tensor(data=scalar, shape=())]
    )


def _key_n(cache, n):
    return cache.key("m", 1, [tensor(data=np.full((1,), n, np.float32))], [], {})


def test_lru_evicts_least_recently_used_first_under_a_byte_bound():
    cache = ResponseCache(3 * (100 + ENTRY_OVERHEAD_BYTES))
    keys = [_key_n(cache, i) for i in range(5)]
    cache.put(keys[0], "m", b"a" * 100)
    cache.put(keys[1], "m", b"b" * 100)
    cache.put(keys[2], "m", b"c" * 100)
    assert cache.get(keys[0]) == b"a" * 100  # refreshes 0: 1 is now the oldest
    cache.put(keys[3], "m", b"d" * 100)
    assert cache.get(keys[1]) is None
    assert [cache.get(k) is not None for k in keys[:4]] == [True, False, True, True]
    # A big entry pushes out as many as it needs, oldest first (2, then 0).
    cache.put(keys[4], "m", b"e" * (100 + ENTRY_OVERHEAD_BYTES + 100))
    assert cache.get(keys[2]) is None and cache.get(keys[0]) is None
    assert cache.get(keys[3]) is not None and cache.get(keys[4]) is not None
    assert cache.size_bytes <= cache.max_bytes
    assert cache.stats.total.evictions == 3 and cache.stats.total.entries == 2


def test_an_entry_larger_than_the_cache_is_not_stored():
    cache = ResponseCache(100)
    cache.put(_key_n(cache, 0), "m", b"x" * 200)
    assert len(cache) == 0 and cache.size_bytes == 0


def test_a_forced_digest_collision_cannot_return_another_keys_value():
    cache = ResponseCache(1 << 20, digest=lambda parts: b"\0" * 32)
    first, second = _key_n(cache, 1), _key_n(cache, 2)
    assert first.digest == second.digest and first.check != second.check
    cache.put(first, "m", b"first")
    assert cache.get(second) is None
    assert cache.get(first) == b"first"


def test_an_alias_leads_only_to_its_own_models_version_and_entry():
    cache = ResponseCache(1 << 20)
    entry = key(cache)
    cache.put(entry, "m", b"answer")
    cache.add_alias(b"message as sent", entry, "m", 1, rows=1)
    assert cache.lookup_alias(b"message as sent", "m", 1) == (b"answer", 1)
    assert cache.lookup_alias(b"message as sent", "m", 2) is None  # another version
    assert cache.lookup_alias(b"message as sent", "other", 1) is None
    assert cache.lookup_alias(b"another message", "m", 1) is None
    assert cache.stats.total.hits == 1
    # The entry leaves (evicted, or its model reloaded): its alias goes with it.
    cache.drop_model("m")
    assert cache.lookup_alias(b"message as sent", "m", 1) is None
    assert len(cache._aliases) == 0
    # An alias is only made for an entry that is there.
    cache.add_alias(b"message as sent", entry, "m", 1, rows=1)
    assert len(cache._aliases) == 0


def test_a_fingerprint_collision_cannot_return_another_messages_value():
    # Two long messages alike in every sampled byte, different in one byte elsewhere.
    size = 8 * FINGERPRINT_SAMPLE_BYTES
    one = bytearray(size)
    two = bytearray(size)
    two[FINGERPRINT_SAMPLE_BYTES + 7] = 1
    one, two = bytes(one), bytes(two)
    cache = ResponseCache(1 << 20)
    entry = key(cache)
    cache.put(entry, "m", b"answer")
    cache.add_alias(one, entry, "m", 1, rows=1)
    assert cache.lookup_alias(one, "m", 1) == (b"answer", 1)
    assert cache.lookup_alias(two, "m", 1) is None
    # The second message cannot take the fingerprint: its requests take the full path.
    cache.add_alias(two, entry, "m", 1, rows=1)
    assert cache.lookup_alias(two, "m", 1) is None
    assert cache.lookup_alias(one, "m", 1) == (b"answer", 1)


def test_aliases_count_in_the_byte_bound_and_leave_with_their_entry():
    entry_size = len(b"answer") + ENTRY_OVERHEAD_BYTES
    alias_size = 100 + ALIAS_OVERHEAD_BYTES
    cache = ResponseCache(2 * entry_size + alias_size)
    first, second = _key_n(cache, 1), _key_n(cache, 2)
    cache.put(first, "m", b"answer")
    cache.put(second, "m", b"answer")
    cache.add_alias(b"a" * 100, first, "m", 1, rows=1)  # fits: first is now most recent
    assert cache.size_bytes == 2 * entry_size + alias_size
    assert cache.stats.model("m").bytes == cache.size_bytes
    # An alias that does not fit beside the rest evicts the least recently used entry.
    cache.add_alias(b"b" * 100, second, "m", 1, rows=1)
    assert cache.get(first) is None and cache.lookup_alias(b"a" * 100, "m", 1) is None
    assert cache.lookup_alias(b"b" * 100, "m", 1) == (b"answer", 1)
    # Replacing an entry takes its aliases along, and their bytes.
    cache.put(second, "m", b"answer")
    assert len(cache._aliases) == 0 and cache.size_bytes == entry_size
    # An alias that cannot fit beside its own entry is refused, evicting nothing.
    cache.add_alias(b"c" * cache.max_bytes, second, "m", 1, rows=1)
    assert len(cache._aliases) == 0 and cache.get(second) is not None


def test_an_entry_takes_a_bounded_number_of_aliases():
    cache = ResponseCache(1 << 20)
    entry = key(cache)
    cache.put(entry, "m", b"answer")
    for n in range(MAX_ALIASES_PER_ENTRY + 1):
        cache.add_alias(bytes([n]), entry, "m", 1, rows=1)
    assert len(cache._aliases) == MAX_ALIASES_PER_ENTRY


def test_drop_model_forgets_only_that_model():
    cache = ResponseCache(1 << 20)
    a = cache.key("a", 1, [tensor()], [], {})
    b = cache.key("b", 1, [tensor()], [], {})
    cache.put(a, "a", b"1")
    cache.put(b, "b", b"2")
    assert cache.drop_model("a") == 1
    assert cache.get(a) is None and cache.get(b) == b"2"
    assert cache.stats.model("a").entries == 0 and cache.stats.model("b").entries == 1


def started(body: Callable[[], Awaitable[bytes]]) -> Callable[[], asyncio.Future[bytes]]:
    """A compute for get_or_compute: `body` started in a task (a future of its value)."""
    return lambda: asyncio.ensure_future(body())


async def test_concurrent_misses_compute_once_and_survive_the_first_callers_cancel():
    cache = ResponseCache(1 << 20)
    k = _key_n(cache, 7)
    gate = asyncio.Event()
    calls = 0

    async def compute() -> bytes:
        nonlocal calls
        calls += 1
        await gate.wait()
        return b"answer"

    first = asyncio.create_task(cache.get_or_compute(k, "m", started(compute)))
    await asyncio.sleep(0)
    others = [asyncio.create_task(cache.get_or_compute(k, "m", started(compute))) for _ in range(4)]
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    results = await asyncio.gather(*others)
    assert results == [(b"answer", "coalesced")] * 4
    assert calls == 1
    assert first.cancelled()
    assert await cache.get_or_compute(k, "m", started(compute)) == (b"answer", "hit")
    s = cache.stats.total
    assert (s.misses, s.coalesced, s.hits) == (1, 4, 1)


async def test_a_computation_nobody_waits_for_is_cancelled_and_the_next_caller_starts_afresh():
    cache = ResponseCache(1 << 20)
    k = _key_n(cache, 8)
    gate, running = asyncio.Event(), asyncio.Event()
    ended: list[str] = []
    computations: list[asyncio.Future[bytes]] = []

    async def body() -> bytes:
        running.set()
        try:
            await gate.wait()
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise
        ended.append("answered")
        return b"answer"

    def compute() -> asyncio.Future[bytes]:
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
    assert await cache.get_or_compute(k, "m", compute) == (b"answer", "miss")
    assert len(computations) == 2 and ended == ["cancelled", "answered"]
    assert cache.get(k) == b"answer"


async def test_a_failure_reaches_every_waiter_and_nothing_is_stored():
    cache = ResponseCache(1 << 20)
    k = _key_n(cache, 3)
    gate = asyncio.Event()

    async def compute() -> bytes:
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

    async def compute() -> bytes:
        await gate.wait()
        return b"old model's answer"

    waiter = asyncio.create_task(cache.get_or_compute(k, "m", started(compute)))
    await asyncio.sleep(0)
    cache.drop_model("m")
    gate.set()
    assert (await waiter)[0] == b"old model's answer"
    assert cache.get(k) is None
