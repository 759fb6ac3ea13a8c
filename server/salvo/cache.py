"""The response cache: one server-wide LRU, bounded in bytes, with in-flight coalescing.

A key is a 256-bit SHA-256 digest over everything that decides a response: model name and
version, each input (sorted by name) with its datatype, shape and canonical little-endian
bytes, the requested outputs in order, and the request parameters that can change a result.
Raw and typed encodings of one tensor decode to the same bytes, so they share a key.

Each entry also keeps a CRC-32 of that material as a check, and a lookup whose check differs
is a miss: a collision of the 256-bit digest (forced in tests through the `digest` seam)
returns another request's response only if the CRC collides too. SHA-256 because it is the
fastest 256-bit cryptographic digest here (the CPU's SHA extensions): twice BLAKE2b's speed
on a 48 KiB `resnet` input, and the hash is most of a large input's hit path.

Values are serialized ModelInferResponse messages without their `id`: a hit is answered by
appending the caller's id to those bytes, with no tensor copied or re-encoded.

Aliases make a repeated request cheaper still. Once a request has been answered from the
cache, the digest of its message as sent (serialized deterministically, without its `id`)
is remembered as an alias of its key; the next request with the same message is answered
through the alias, before its inputs are decoded, validated or hashed again. An alias only
ever leads to an entry that the key derived from the same message indexes, it carries a
CRC-32 check of its own, and it goes when its model is reloaded or unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .codec import Tensor, encode_tensor_raw

# Parameters that say how to serve a request, never what its answer is.
NON_SEMANTIC_PARAMETERS = frozenset({"priority", "timeout", "cache", "traceparent", "tracestate"})
ENTRY_OVERHEAD_BYTES = 160
"""Bytes charged per entry beyond its value: key, check, and the bookkeeping objects."""
MAX_ALIASES = 16_384
"""Aliases kept (least recently used go first): about 300 bytes each, outside the byte bound."""


@dataclass(frozen=True, slots=True)
class CacheKey:
    """The digest that indexes the cache and the check stored beside it."""

    digest: bytes
    check: bytes


@dataclass(slots=True)
class _Entry:
    check: bytes
    value: bytes
    model: str
    size: int


@dataclass(slots=True)
class _Alias:
    check: bytes
    key: CacheKey
    model: str
    version: int
    rows: int


@dataclass(slots=True)
class CacheCounters:
    """Cumulative cache counters, server-wide or for one model."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


@dataclass(slots=True)
class CacheStats:
    """Counters for the whole cache and per model (the metrics layer reads these)."""

    total: CacheCounters = field(default_factory=CacheCounters)
    models: dict[str, CacheCounters] = field(default_factory=dict)

    def model(self, name: str) -> CacheCounters:
        counters = self.models.get(name)
        if counters is None:
            counters = self.models[name] = CacheCounters()
        return counters


def _sha256(parts: Iterable[bytes | memoryview]) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


def _crc32(parts: Iterable[bytes | memoryview]) -> bytes:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc.to_bytes(4, "little")


def _field(data: bytes | memoryview) -> list[bytes | memoryview]:
    """A length-prefixed field, so that no two different sequences hash alike."""
    return [len(data).to_bytes(8, "little"), data]


def _canonical(tensor: Tensor) -> bytes | memoryview:
    if tensor.datatype == "BYTES":
        return encode_tensor_raw("BYTES", tensor.data)
    data = tensor.data
    if data.dtype.byteorder == ">" or not data.flags.c_contiguous:
        data = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
    return data.data.cast("B")


class ResponseCache:
    """A byte-bounded LRU of serialized responses, shared by every model that enables it."""

    def __init__(
        self,
        max_bytes: int,
        digest: Callable[[Sequence[bytes | memoryview]], bytes] | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self._digest = digest
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[bytes]] = {}
        self._generation: dict[str, int] = {}
        self._aliases: OrderedDict[bytes, _Alias] = OrderedDict()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """Bytes held now, entry overhead included."""
        return self.stats.total.bytes

    def key(
        self,
        model: str,
        version: int,
        tensors: Sequence[Tensor],
        outputs: Sequence[str],
        parameters: dict[str, object],
    ) -> CacheKey:
        """The key of a request whose inputs decoded to `tensors`."""
        parts: list[bytes | memoryview] = []
        parts += _field(model.encode())
        parts += _field(str(version).encode())
        for tensor in sorted(tensors, key=lambda t: t.name):
            parts += _field(tensor.name.encode())
            parts += _field(tensor.datatype.encode())
            parts += _field(np.asarray(tensor.shape, dtype="<i8").tobytes())
            parts += _field(_canonical(tensor))
        parts += _field("\0".join(outputs).encode())
        semantic = sorted(
            (k, repr(v)) for k, v in parameters.items() if k not in NON_SEMANTIC_PARAMETERS
        )
        parts += _field(repr(semantic).encode())
        return self._key(parts)

    def message_key(self, message: bytes) -> CacheKey:
        """The alias key of a request message as sent (deterministic bytes, `id` cleared)."""
        return self._key((message,))

    def _key(self, parts: Sequence[bytes | memoryview]) -> CacheKey:
        digest = (_sha256 if self._digest is None else self._digest)(parts)
        return CacheKey(digest, _crc32(parts))

    def lookup_alias(
        self, alias_key: CacheKey, model: str, version: int
    ) -> tuple[bytes, int] | None:
        """The cached value and batch rows for a message seen before, counted as a hit; None
        when there is no alias (or its entry has gone), not counted."""
        alias = self._aliases.get(alias_key.digest)
        if alias is None or alias.check != alias_key.check:
            return None
        if alias.model != model or alias.version != version:
            return None
        value = self.lookup(alias.key, model)
        if value is None:
            del self._aliases[alias_key.digest]
            return None
        self._aliases.move_to_end(alias_key.digest)
        return value, alias.rows

    def add_alias(
        self, alias_key: CacheKey, key: CacheKey, model: str, version: int, rows: int
    ) -> None:
        """Remember that the message behind `alias_key` has the cache key `key`."""
        if key.digest not in self._entries:
            return
        self._aliases[alias_key.digest] = _Alias(alias_key.check, key, model, version, rows)
        self._aliases.move_to_end(alias_key.digest)
        while len(self._aliases) > MAX_ALIASES:
            self._aliases.popitem(last=False)

    def get(self, key: CacheKey) -> bytes | None:
        """The cached value, refreshed as most recently used; None on a miss."""
        entry = self._entries.get(key.digest)
        if entry is None or entry.check != key.check:
            return None
        self._entries.move_to_end(key.digest)
        return entry.value

    def put(self, key: CacheKey, model: str, value: bytes) -> None:
        """Store a complete, successful response; evict least recently used to fit."""
        size = len(value) + ENTRY_OVERHEAD_BYTES
        if size > self.max_bytes:
            return
        self._discard(key.digest)
        self._entries[key.digest] = _Entry(key.check, value, model, size)
        self._account(model, size, 1)
        while self.stats.total.bytes > self.max_bytes:
            digest, oldest = next(iter(self._entries.items()))
            self._discard(digest)
            self.stats.total.evictions += 1
            self.stats.model(oldest.model).evictions += 1

    def _discard(self, digest: bytes) -> None:
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self._account(entry.model, -entry.size, -1)

    def _account(self, model: str, size: int, count: int) -> None:
        for counters in (self.stats.total, self.stats.model(model)):
            counters.bytes += size
            counters.entries += count

    def observe(self) -> list[tuple[str, float, dict[str, str]]]:
        """Per-model counters for the metrics layer."""
        out: list[tuple[str, float, dict[str, str]]] = []
        for model, c in list(self.stats.models.items()):
            labels = {"model": model}
            out += [
                ("cache_hits", c.hits, labels),
                ("cache_misses", c.misses, labels),
                ("cache_coalesced", c.coalesced, labels),
                ("cache_evictions", c.evictions, labels),
                ("cache_bytes", c.bytes, labels),
                ("cache_entries", c.entries, labels),
            ]
        return out

    def drop_model(self, model: str) -> int:
        """Forget every entry of `model` (it was reloaded or unloaded); returns how many."""
        self._generation[model] = self._generation.get(model, 0) + 1
        doomed = [d for d, e in self._entries.items() if e.model == model]
        for digest in doomed:
            self._discard(digest)
        for digest in [d for d, a in self._aliases.items() if a.model == model]:
            del self._aliases[digest]
        return len(doomed)

    def lookup(self, key: CacheKey, model: str) -> bytes | None:
        """The cached value, counted as a hit; None on a miss (not counted: see get_or_compute).

        Synchronous, so the hot path answers a hit without creating a task or a coroutine.
        """
        value = self.get(key)
        if value is not None:
            self.stats.total.hits += 1
            self.stats.model(model).hits += 1
        return value

    async def get_or_compute(
        self, key: CacheKey, model: str, compute: Callable[[], Awaitable[bytes]]
    ) -> tuple[bytes, str]:
        """The value for `key` and how it was had: "hit", "coalesced" or "miss".

        On a miss `compute` runs once in its own task, so a caller that cancels does not
        cancel it for the others waiting on the same key; a failure reaches every waiter
        and nothing is stored.
        """
        value = self.lookup(key, model)
        if value is not None:
            return value, "hit"
        counters = (self.stats.total, self.stats.model(model))
        task = self._inflight.get(key.digest)
        if task is not None:
            for c in counters:
                c.coalesced += 1
            return await asyncio.shield(task), "coalesced"
        for c in counters:
            c.misses += 1
        generation = self._generation.get(model, 0)
        task = asyncio.create_task(self._fill(key, model, compute, generation))
        self._inflight[key.digest] = task
        return await asyncio.shield(task), "miss"

    async def _fill(
        self,
        key: CacheKey,
        model: str,
        compute: Callable[[], Awaitable[bytes]],
        generation: int,
    ) -> bytes:
        try:
            value = await compute()
            if self._generation.get(model, 0) == generation:  # not reloaded meanwhile
                self.put(key, model, value)
            return value
        finally:
            self._inflight.pop(key.digest, None)
            task = asyncio.current_task()
            if task is not None:
                # Waiters that left must not leave "exception never retrieved" behind.
                task.add_done_callback(_quiet)


def _quiet(task: asyncio.Task) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        task.exception()
