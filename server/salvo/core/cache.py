"""The response cache: one server-wide LRU of outputs, bounded in bytes, with in-flight
coalescing.

Keys and values are domain data, so requests over any transport share entries. A key is a
256-bit SHA-256 digest over everything that decides a response: model name and version,
each input in config order with its shape, dtype and canonical little-endian bytes, the
requested outputs in order, and the request parameters that can change a result. Raw and
typed encodings of one tensor decode to the same bytes, so they share a key. Each entry also
keeps a CRC-32 of that material as a check, and a lookup whose check differs is a miss: a
collision of the digest (forced in tests through the `digest` seam) returns another
request's response only if the CRC collides too. SHA-256 because it is the fastest 256-bit
cryptographic digest here (the CPU's SHA extensions): the hash is most of a large input's
hit path.

An entry holds the outputs as arrays of its own (copied out of the batch, read-only), as
many bytes as the raw tensors: a hit is encoded again by its front end, which for a
response of raw tensors is one copy of their bytes.

Aliases make a repeated request cheaper still. Once a request has been answered from the
cache, what the front end received (its `fingerprint`: for gRPC, the message serialized
deterministically without its id) is remembered as an alias of the entry, per transport;
the next request with the same fingerprint is answered through the alias, before its
inputs are decoded, validated or hashed. An alias is found by a sample of the fingerprint
(all of it when short; else its length and three 1 KiB samples) and then compared in full,
so it is exact without a digest. Two fingerprints with one sample cannot both have an alias
(the second takes the full path, correctly). An alias belongs to its entry: its bytes count
in the entry's size, and it goes when the entry is evicted, replaced or dropped.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from salvo.domain.types import Prepared

# Parameters that say how to serve a request, never what its answer is.
NON_SEMANTIC_PARAMETERS = frozenset({"priority", "timeout", "cache", "traceparent", "tracestate"})
ENTRY_OVERHEAD_BYTES = 160
"""Bytes charged per entry beyond its outputs: key, check, and the bookkeeping objects."""
ALIAS_OVERHEAD_BYTES = 160
"""Bytes charged per alias beyond its fingerprint."""
MAX_ALIASES_PER_ENTRY = 4
"""Different fingerprints (encodings, transports, output lists) that may lead to one entry."""
FINGERPRINT_SAMPLE_BYTES = 1024
"""A fingerprint longer than four of these is found by three samples of this size."""


def cacheable(parameters: Mapping[str, object]) -> bool:
    """False when the request asks to bypass the cache (`cache`: false or "bypass")."""
    value = parameters.get("cache", True)
    if isinstance(value, str):
        return value.lower() not in ("false", "bypass", "off", "0", "no")
    return bool(value)


@dataclass(frozen=True, slots=True)
class CacheKey:
    """The digest that indexes the cache and the check stored beside it."""

    digest: bytes
    check: bytes


class Cached:
    """A cached response: the outputs asked for."""

    __slots__ = ("aliases", "arrays", "check", "model", "size")

    def __init__(self, arrays: tuple[np.ndarray, ...]) -> None:
        self.arrays = arrays
        self.check = b""
        self.model = ""
        self.size = 0
        self.aliases: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Alias:
    """What a fingerprint seen before leads to: its key, and what its request asked."""

    fingerprint: bytes
    key: CacheKey
    model: str
    version: int
    outputs: tuple[int, ...]
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


def _sample(fingerprint: bytes) -> bytes:
    """What finds an alias: the fingerprint when short, else its length and three samples."""
    size, sample = len(fingerprint), FINGERPRINT_SAMPLE_BYTES
    if size <= 4 * sample:
        return fingerprint
    middle = size // 2
    return b"".join(
        (
            size.to_bytes(8, "little"),
            fingerprint[:sample],
            fingerprint[middle : middle + sample],
            fingerprint[-sample:],
        )
    )


def _canonical(array: np.ndarray) -> bytes | memoryview:
    """`array`'s elements as little-endian bytes in row-major order."""
    if array.dtype.kind == "O":  # BYTES: each element with its 4-byte length
        return b"".join(len(x).to_bytes(4, "little") + bytes(x) for x in array.flat)
    if array.dtype.byteorder == ">" or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return array.data.cast("B")


def _dtype_name(array: np.ndarray) -> str:
    """`array`'s dtype as its little-endian name: byte order is how it is held, not what."""
    dtype = array.dtype
    return dtype.newbyteorder("<").str if dtype.byteorder == ">" else dtype.str


def _owned(array: np.ndarray) -> np.ndarray:
    """A read-only copy of `array` (a view into its batch's outputs), for the cache to keep."""
    copy = np.array(array, copy=True, order="C")
    copy.flags.writeable = False
    return copy


class ResponseCache:
    """A byte-bounded LRU of responses, shared by every model that enables it."""

    def __init__(
        self,
        max_bytes: int,
        digest: Callable[[Sequence[bytes | memoryview]], bytes] | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self._digest = digest
        self._entries: OrderedDict[bytes, Cached] = OrderedDict()
        self._inflight: dict[bytes, _Flight] = {}
        self._generation: dict[str, int] = {}
        self._aliases: dict[tuple[str, bytes], Alias] = {}
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """Bytes held now, overheads included."""
        return self.stats.total.bytes

    def key(self, request: Prepared) -> CacheKey:
        """The key of a prepared request.

        Everything but the inputs' bytes goes into one `repr` (unambiguous for the str,
        int and tuple values in it), then each input's canonical bytes, each part with its
        length in front, so that no two different requests give the same material.
        """
        parameters = request.parameters
        semantic = (
            sorted((k, repr(v)) for k, v in parameters.items() if k not in NON_SEMANTIC_PARAMETERS)
            if parameters
            else ()
        )
        head = repr(
            (
                request.model,
                request.version,
                tuple((_dtype_name(a), a.shape) for a in request.inputs),
                request.outputs,
                tuple(semantic),
            )
        ).encode()
        parts: list[bytes | memoryview] = [len(head).to_bytes(8, "little"), head]
        for array in request.inputs:
            data = _canonical(array)
            parts += (len(data).to_bytes(8, "little"), data)
        digest = (_sha256 if self._digest is None else self._digest)(parts)
        return CacheKey(digest, _crc32(parts))

    def get(self, key: CacheKey) -> Cached | None:
        """The cached response, refreshed as most recently used; None on a miss."""
        entry = self._entries.get(key.digest)
        if entry is None or entry.check != key.check:
            return None
        self._entries.move_to_end(key.digest)
        return entry

    def lookup(self, key: CacheKey, model: str) -> Cached | None:
        """`get`, counted as a hit; a miss is not counted (see get_or_compute).
        Synchronous, so a hit is answered without a task or a coroutine."""
        entry = self.get(key)
        if entry is not None:
            self.stats.total.hits += 1
            self.stats.model(model).hits += 1
        return entry

    def lookup_alias(
        self, transport: str, fingerprint: bytes, model: str, version: int
    ) -> tuple[Cached, Alias] | None:
        """The cached response for a fingerprint seen before, and its alias, counted as a
        hit; None when there is no alias for it, not counted."""
        alias = self._aliases.get((transport, _sample(fingerprint)))
        if alias is None or alias.fingerprint != fingerprint:
            return None
        if alias.model != model or alias.version != version:
            return None
        entry = self.lookup(alias.key, model)
        return None if entry is None else (entry, alias)

    def add_alias(
        self, transport: str, fingerprint: bytes, key: CacheKey, request: Prepared
    ) -> None:
        """Remember that `fingerprint` has the key `key`, if its entry is there and the
        alias fits: its bytes are charged to the entry, evicting others as a put does."""
        entry = self._entries.get(key.digest)
        sample = _sample(fingerprint)
        found = (transport, sample)
        if entry is None or entry.check != key.check or found in self._aliases:
            return
        charge = len(fingerprint) + ALIAS_OVERHEAD_BYTES
        if sample is not fingerprint:
            charge += len(sample)
        if len(entry.aliases) >= MAX_ALIASES_PER_ENTRY or entry.size + charge > self.max_bytes:
            return
        self._aliases[found] = Alias(
            fingerprint, key, request.model, request.version, request.outputs, request.rows
        )
        entry.aliases += (found,)
        self._grow(key.digest, entry, charge)

    def put(self, key: CacheKey, model: str, arrays: Sequence[np.ndarray]) -> Cached | None:
        """Store a complete, successful response (evicting the least recently used to fit)
        and return it; None for one too large to store."""
        size = sum(a.nbytes for a in arrays) + ENTRY_OVERHEAD_BYTES
        if size > self.max_bytes:
            return None
        self._discard(key.digest)
        entry = Cached(tuple(_owned(a) for a in arrays))
        entry.check, entry.model, entry.size = key.check, model, size
        self._entries[key.digest] = entry
        self._account(model, size, 1)
        self._evict_to_fit()
        return entry

    def _grow(self, digest: bytes, entry: Cached, size: int) -> None:
        entry.size += size
        self._account(entry.model, size, 0)
        self._entries.move_to_end(digest)
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
            for found in entry.aliases:
                del self._aliases[found]

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

    async def get_or_compute(
        self,
        key: CacheKey,
        model: str,
        compute: Callable[[], asyncio.Future[Sequence[np.ndarray]]],
    ) -> tuple[Cached, str]:
        """The response for `key` and how it was had: "hit", "coalesced" or "miss".

        On a miss `compute` is called at once and returns a future of the outputs (the
        request is queued by then, so it joins the batch now forming). Every caller for
        the key awaits that one future, each through a shield: a caller that cancels does
        not cancel it for the others, but when the last caller has gone the future is
        cancelled, and its producer drops the work (a request nobody waits for any more
        never runs). A failure reaches every waiter and nothing is stored.
        """
        found = self.lookup(key, model)
        if found is not None:
            return found, "hit"
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
            flight = _Flight(compute(), model, self._generation.get(model, 0))
            self._inflight[key.digest] = flight
            # Registered before any caller's shield, so the response is stored before the
            # callers wake.
            flight.future.add_done_callback(functools.partial(self._settle, key, flight))
            outcome = "miss"
        try:
            await asyncio.shield(flight.future)
        except asyncio.CancelledError:
            flight.callers -= 1
            if flight.callers == 0:
                # Nobody waits: later callers start afresh rather than join a cancelled one.
                self._land(key, flight)
                flight.future.cancel()
            raise
        if flight.cached is None:
            # The computation ended in this very turn of the loop, before its callback
            # ran: a caller that joined then finds it done without waiting.
            self._settle(key, flight, flight.future)
        assert flight.cached is not None
        return flight.cached, outcome

    def _settle(self, key: CacheKey, flight: _Flight, future: asyncio.Future) -> None:
        """A computation ended: store its outputs (unless its model was reloaded meanwhile).
        Once per flight, whoever comes first: its done-callback or a caller."""
        self._land(key, flight)
        if flight.cached is not None or future.cancelled() or future.exception() is not None:
            return  # retrieved, so a failure nobody waits for any more is not logged
        arrays = future.result()
        stored = None
        if self._generation.get(flight.model, 0) == flight.generation:
            stored = self.put(key, flight.model, arrays)
        flight.cached = stored if stored is not None else Cached(tuple(arrays))

    def _land(self, key: CacheKey, flight: _Flight) -> None:
        """`flight` is no longer the one callers for `key` join (it may be gone already)."""
        if self._inflight.get(key.digest) is flight:
            del self._inflight[key.digest]


@dataclass(slots=True)
class _Flight:
    """A computation in progress for one key (of `model` as it was at `generation`), how
    many callers wait on it, and the response once it has landed."""

    future: asyncio.Future[Sequence[np.ndarray]]
    model: str
    generation: int
    callers: int = 1
    cached: Cached | None = None
