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
cache, its message as sent (serialized deterministically, without its `id`) is remembered
as an alias of its entry; the next request with the same message is answered through the
alias, before its inputs are decoded, validated or hashed again. An alias is found by a
fingerprint of the message (the message itself when short; else its length and three 1 KiB
samples) and then compared with the message in full, so it is exact without a digest: about
3 us on a 48 KiB `resnet` message, against 39 us for SHA-256 and CRC-32. Two messages with
one fingerprint cannot both have an alias (the second takes the full path, correctly). An
alias belongs to its entry: its bytes count in the entry's size (so the byte bound covers
them), and it goes when the entry is evicted, replaced or dropped with its model.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .codec import Tensor, encode_tensor_raw

# Parameters that say how to serve a request, never what its answer is.
NON_SEMANTIC_PARAMETERS = frozenset({"priority", "timeout", "cache", "traceparent", "tracestate"})
ENTRY_OVERHEAD_BYTES = 160
"""Bytes charged per entry beyond its value: key, check, and the bookkeeping objects."""
ALIAS_OVERHEAD_BYTES = 160
"""Bytes charged per alias beyond its message."""
MAX_ALIASES_PER_ENTRY = 4
"""Different messages (encodings, output lists) that may lead to one entry."""
FINGERPRINT_SAMPLE_BYTES = 1024
"""A message longer than four of these is fingerprinted by three samples of this size."""


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
    aliases: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class _Alias:
    message: bytes
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


def _fingerprint(message: bytes) -> bytes:
    """What finds an alias: the message when short, else its length and three samples."""
    size, sample = len(message), FINGERPRINT_SAMPLE_BYTES
    if size <= 4 * sample:
        return message
    middle = size // 2
    return b"".join(
        (
            size.to_bytes(8, "little"),
            message[:sample],
            message[middle : middle + sample],
            message[-sample:],
        )
    )


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
        self._inflight: dict[bytes, _Flight] = {}
        self._generation: dict[str, int] = {}
        self._aliases: dict[bytes, _Alias] = {}
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
        """The key of a request whose inputs decoded to `tensors`.

        Everything but the tensors' bytes goes into one `repr` (unambiguous for the str,
        int and tuple values in it), then each tensor's canonical bytes, each field with
        its length in front, so that no two different requests give the same material.
        """
        if len(tensors) > 1:
            tensors = sorted(tensors, key=lambda t: t.name)
        semantic = (
            sorted((k, repr(v)) for k, v in parameters.items() if k not in NON_SEMANTIC_PARAMETERS)
            if parameters
            else ()
        )
        head = repr(
            (
                model,
                version,
                tuple((t.name, t.datatype, tuple(t.shape)) for t in tensors),
                tuple(outputs),
                tuple(semantic),
            )
        ).encode()
        parts: list[bytes | memoryview] = [len(head).to_bytes(8, "little"), head]
        for tensor in tensors:
            data = _canonical(tensor)
            parts += (len(data).to_bytes(8, "little"), data)
        digest = (_sha256 if self._digest is None else self._digest)(parts)
        return CacheKey(digest, _crc32(parts))

    def lookup_alias(self, message: bytes, model: str, version: int) -> tuple[bytes, int] | None:
        """The cached value and batch rows for a message seen before, counted as a hit; None
        when there is no alias for it, not counted."""
        alias = self._aliases.get(_fingerprint(message))
        if alias is None or alias.message != message:
            return None
        if alias.model != model or alias.version != version:
            return None
        value = self.lookup(alias.key, model)
        return None if value is None else (value, alias.rows)

    def add_alias(self, message: bytes, key: CacheKey, model: str, version: int, rows: int) -> None:
        """Remember that `message` has the cache key `key`, if its entry is there and the
        alias fits: its bytes are charged to the entry, evicting others as a put does."""
        entry = self._entries.get(key.digest)
        fingerprint = _fingerprint(message)
        if entry is None or entry.check != key.check or fingerprint in self._aliases:
            return
        charge = len(message) + ALIAS_OVERHEAD_BYTES
        if fingerprint is not message:
            charge += len(fingerprint)
        if len(entry.aliases) >= MAX_ALIASES_PER_ENTRY or entry.size + charge > self.max_bytes:
            return
        self._aliases[fingerprint] = _Alias(message, key, model, version, rows)
        entry.aliases += (fingerprint,)
        entry.size += charge
        self._account(model, charge, 0)
        self._entries.move_to_end(key.digest)
        self._evict_to_fit()

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
        self._evict_to_fit()

    def _evict_to_fit(self) -> None:
        while self.stats.total.bytes > self.max_bytes:
            digest, oldest = next(iter(self._entries.items()))
            self._discard(digest)
            self.stats.total.evictions += 1
            self.stats.model(oldest.model).evictions += 1

    def _discard(self, digest: bytes) -> None:
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self._account(entry.model, -entry.size, -1)
            for fingerprint in entry.aliases:
                del self._aliases[fingerprint]

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
        self, key: CacheKey, model: str, compute: Callable[[], asyncio.Future[bytes]]
    ) -> tuple[bytes, str]:
        """The value for `key` and how it was had: "hit", "coalesced" or "miss".

        On a miss `compute` is called at once and returns a future of the value (the
        request is queued by then, so it joins the batch now forming). Every caller for
        the key awaits that one future, each through a shield: a caller that cancels does
        not cancel it for the others, but when the last caller has gone the future is
        cancelled, and its producer drops the work (a request nobody waits for any more
        never runs). A failure reaches every waiter and nothing is stored.
        """
        value = self.lookup(key, model)
        if value is not None:
            return value, "hit"
        counters = (self.stats.total, self.stats.model(model))
        flight = self._inflight.get(key.digest)
        if flight is not None:
            for c in counters:
                c.coalesced += 1
            flight.callers += 1
            outcome = "coalesced"
        else:
            for c in counters:
                c.misses += 1
            flight = _Flight(compute())
            self._inflight[key.digest] = flight
            # Registered before any caller's shield, so the value is stored before they wake.
            flight.future.add_done_callback(
                functools.partial(self._settle, key, model, self._generation.get(model, 0), flight)
            )
            outcome = "miss"
        try:
            return await asyncio.shield(flight.future), outcome
        except asyncio.CancelledError:
            flight.callers -= 1
            if flight.callers == 0:
                # Nobody waits: later callers start afresh rather than join a cancelled one.
                self._land(key, flight)
                flight.future.cancel()
            raise

    def _settle(
        self, key: CacheKey, model: str, generation: int, flight: _Flight, future: asyncio.Future
    ) -> None:
        """A computation ended: store a value (unless its model was reloaded meanwhile)."""
        self._land(key, flight)
        if future.cancelled() or future.exception() is not None:
            return  # retrieved, so a failure nobody waits for any more is not logged
        if self._generation.get(model, 0) == generation:
            self.put(key, model, future.result())

    def _land(self, key: CacheKey, flight: _Flight) -> None:
        """`flight` is no longer the one callers for `key` join (it may be gone already)."""
        if self._inflight.get(key.digest) is flight:
            del self._inflight[key.digest]


@dataclass(slots=True)
class _Flight:
    """A computation in progress for one key, and how many callers wait on it."""

    future: asyncio.Future[bytes]
    callers: int = 1
