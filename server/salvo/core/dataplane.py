"""The data plane: the one path every request takes, whatever its transport.

A front end decodes what arrived into an `InferRequest`, calls `infer` (or `start`, for a
stream that serves its requests side by side) and encodes the `InferResponse`. In between,
once for every transport: the router picks the model version, the request is prepared
against that version's config, the response cache answers or coalesces it, the batcher
runs it, and the version's statistics and the request's telemetry probe are written. The
model-level calls (readiness, metadata, statistics, the repository) are here too, so
that every front end answers them alike.

Errors are the core's (`salvo.domain.status`); the data plane imports no transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from salvo.core.cache import ResponseCache, cacheable
from salvo.core.router import Router, policy_from
from salvo.core.shadow import Shadowing
from salvo.domain.config import ModelConfig
from salvo.domain.stats import ModelStats
from salvo.domain.status import Cancelled
from salvo.domain.types import InferRequest, InferResponse, Prepared
from salvo.engine.repository import ModelEntry, ModelManager, ModelVersion, State
from salvo.observability.telemetry import Probe

Done = Callable[[InferResponse | None, BaseException | None], None]
"""Called once with a started request's response, or with why there is none."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What metadata and config calls say of one model version."""

    name: str
    version: int
    versions: tuple[int, ...]
    """Every version of the model that serves."""
    config: ModelConfig
    device_type: str
    """"cpu" or "cuda": where it was loaded."""


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One line of the repository index."""

    name: str
    version: int | None
    state: str
    reason: str


class DataPlane:
    """Inference and model queries, the same for every front end."""

    def __init__(
        self,
        models: ModelManager,
        router: Router | None = None,
        cache: ResponseCache | None = None,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.models = models
        self.router = router or Router(models)
        self.cache = cache
        self.on_change = on_change
        """Awaited after every load or unload (the server re-derives health)."""
        self.accepting = False
        """Set once start-up has loaded the models; cleared when the server drains."""
        self.shadows = Shadowing()

    # -- inference ---------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        """Serve one request. Raises the core's errors (unknown model, bad input, overload,
        timeout…); a caller that is cancelled while its request is queued withdraws it."""
        start = time.monotonic_ns()
        mv = self.router.route(request.model, request.version, request)
        probe = request.probe
        if probe is not None:
            probe.model, probe.version = mv.name, str(mv.version)
        ok = False
        try:
            cache = self.cache
            if cache is not None and mv.config.response_cache.enable:
                # A request answered from the cache before is answered again through its
                # alias, at once, before its inputs are decoded, validated and hashed.
                fingerprint = request.fingerprint()
                aliased = (
                    None
                    if fingerprint is None
                    else self._aliased(cache, mv, request, probe, start, fingerprint)
                )
                response = aliased or await self._cached(
                    cache, mv, request, probe, start, fingerprint
                )
            else:
                prepared = request.prepare(mv.config, mv.version)
                scheduler = mv.scheduler
                arrays = await scheduler.wait(
                    scheduler.submit(prepared, request.deadline_ns, probe)
                )
                response = InferResponse(
                    mv.config, mv.version, request.id, prepared.outputs, arrays
                )
                if not request.version:
                    self._shadow(mv, prepared, arrays)
            ok = True
            return response
        finally:
            mv.stats.record_request(ok, time.monotonic_ns() - start)

    def start(self, request: InferRequest, done: Done) -> Callable[[], None] | None:
        """Serve `request` alongside others (a stream's): `done` is called once, on the
        loop, with the response or the error, possibly before `start` returns. Returns
        what abandons the request if its caller goes away first (None once answered).

        A request for a model without the cache is queued now and answered from its
        batch's callback, with no task of its own; a cached model's is answered at once
        when its alias finds it, and takes a task otherwise."""
        start = time.monotonic_ns()
        try:
            mv = self.router.route(request.model, request.version, request)
        except Exception as exc:
            done(None, exc)
            return None
        cache = self.cache
        if cache is not None and mv.config.response_cache.enable:
            fingerprint = request.fingerprint()
            if fingerprint is not None:  # a hit through its alias is answered at once
                probe = _probe(request, mv)
                response = self._aliased(cache, mv, request, probe, start, fingerprint)
                if response is not None:
                    mv.stats.record_request(True, time.monotonic_ns() - start)
                    done(response, None)
                    return None
            task = asyncio.ensure_future(self.infer(request))  # routed again: the same way
            task.add_done_callback(lambda t: _finish(t, done))

            def cancel() -> None:
                task.cancel()

            return cancel
        probe = _probe(request, mv)
        scheduler = mv.scheduler
        try:
            prepared = request.prepare(mv.config, mv.version)
            entry = scheduler.submit(prepared, request.deadline_ns, probe)
        except Exception as exc:
            mv.stats.record_request(False, time.monotonic_ns() - start)
            done(None, exc)
            return None

        def answered(waiter: asyncio.Future) -> None:
            response: InferResponse | None = None
            error: BaseException | None = None
            if waiter.cancelled():
                error = Cancelled("the caller went away")
            elif (error := waiter.exception()) is None:
                arrays = waiter.result()
                response = InferResponse(
                    mv.config, mv.version, request.id, prepared.outputs, arrays
                )
            mv.stats.record_request(error is None, time.monotonic_ns() - start)
            done(response, error)
            if response is not None and not request.version:
                self._shadow(mv, prepared, arrays)

        entry.waiter.add_done_callback(answered)
        return lambda: scheduler.abandon(entry)

    @staticmethod
    def _aliased(
        cache: ResponseCache,
        mv: ModelVersion,
        request: InferRequest,
        probe: Probe | None,
        start: int,
        fingerprint: bytes,
    ) -> InferResponse | None:
        """The response for a request whose fingerprint the cache has seen, or None."""
        aliased = cache.lookup_alias(request.transport, fingerprint, mv.name, mv.version)
        if aliased is None:
            return None
        cached, alias = aliased
        now = time.monotonic_ns()
        mv.stats.record_cache_hit(now - start, now - start)
        if probe is not None:
            probe.cache = "hit"
        return InferResponse(mv.config, mv.version, request.id, alias.outputs, cached.arrays)

    async def _cached(
        self,
        cache: ResponseCache,
        mv: ModelVersion,
        request: InferRequest,
        probe: Probe | None,
        start: int,
        fingerprint: bytes | None,
    ) -> InferResponse:
        """`request` through the response cache (unless it bypasses it)."""
        stats = mv.stats
        prepared = request.prepare(mv.config, mv.version)
        if not cacheable(prepared.parameters):
            arrays = await mv.scheduler.infer(prepared, request.deadline_ns, probe)
            return InferResponse(mv.config, mv.version, request.id, prepared.outputs, arrays)
        looking = time.monotonic_ns()
        key = cache.key(prepared)
        found = cache.lookup(key, mv.name)
        if found is not None:
            cached, outcome = found, "hit"
            if fingerprint is not None:
                cache.add_alias(request.transport, fingerprint, key, prepared)
            now = time.monotonic_ns()
            stats.record_cache_hit(now - looking, now - start)
        else:
            looked = time.monotonic_ns() - looking
            # A caller waits until its own deadline, when its transport cancels it; the
            # computation goes on for the others (see ResponseCache.get_or_compute).
            cached, outcome = await cache.get_or_compute(
                key, mv.name, lambda: self._computed(mv, prepared)
            )
            if outcome == "miss":
                stats.record_cache_miss(looked)
            else:  # coalesced: answered by another request's computation, as a hit
                stats.record_cache_hit(looked, time.monotonic_ns() - start)
        if probe is not None:
            probe.cache = outcome
        if not request.version:
            self._shadow(mv, prepared, cached.arrays)
        return InferResponse(mv.config, mv.version, request.id, prepared.outputs, cached.arrays)

    def _shadow(self, mv: ModelVersion, prepared: Prepared, arrays: Sequence[np.ndarray]) -> None:
        """Copy an answered request to the candidate version its policy shadows, if any."""
        candidate = self.router.shadow(mv)
        if candidate is not None:
            self.shadows.run(candidate, prepared, mv.version, arrays)

    @staticmethod
    def _computed(mv: ModelVersion, request: Prepared) -> asyncio.Future[Sequence[np.ndarray]]:
        """Queue `request` now; the future of its outputs for the cache. Cancelling the
        future (the cache does when no caller waits any more) drops the request.

        It is shared by every caller waiting on the same key, so it takes no caller's
        deadline: each caller waits only until its own.
        """
        scheduler = mv.scheduler
        entry = scheduler.submit(request)
        outputs: asyncio.Future[Sequence[np.ndarray]] = asyncio.get_running_loop().create_future()

        def settle(waiter: asyncio.Future) -> None:
            if outputs.done():
                return
            if waiter.cancelled():
                outputs.cancel()
            elif (error := waiter.exception()) is not None:
                outputs.set_exception(error)
            else:
                outputs.set_result(waiter.result())

        def dropped(future: asyncio.Future) -> None:
            if future.cancelled():
                scheduler.abandon(entry)

        entry.waiter.add_done_callback(settle)
        outputs.add_done_callback(dropped)
        return outputs

    # -- models ------------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether the server takes inferences: started, not draining, every model loaded
        (Triton's strict readiness)."""
        return self.accepting and self.models.all_ready()

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether that model (and version) serves. Raises InvalidRequest for a name that
        cannot name a model; any other failure to route means not ready."""
        with contextlib.suppress(Exception):
            self.router.route(name, version)
            return True
        self.models.check_name(name)
        return False

    def model_info(self, name: str, version: str = "") -> ModelInfo:
        """The version a request for `name` and `version` would reach, described."""
        mv = self.router.route(name, version)
        entry = self.models.models[mv.name]
        return ModelInfo(mv.name, mv.version, tuple(sorted(entry.versions)), mv.config,
                         mv.device_type)  # fmt: skip

    def traffic(self, name: str) -> dict[str, object]:
        """The traffic policy `name`'s requests that name no version follow, where it comes
        from (admin, config or default) and the versions serving."""
        entry = self.models.entry(name)
        policy, source = self.router.policy(name)
        compared = [
            {"version": primary, "shadow_version": candidate, **tally.describe()}
            for (model, primary, candidate), tally in sorted(self.shadows.tallies.items())
            if model == name
        ]
        return {"model": name, "source": source, **policy.describe(),
                "serving": sorted(entry.versions), "shadow_comparisons": compared}  # fmt: skip

    def set_traffic(self, name: str, document: Mapping[str, object]) -> dict[str, object]:
        """Replace `name`'s traffic policy with the admin API's `document` (checked against
        the versions serving); the policy now in force."""
        entry = self.models.entry(name)
        self.router.set_policy(name, policy_from(document, sorted(entry.versions)))
        return self.traffic(name)

    def clear_traffic(self, name: str) -> dict[str, object]:
        """Drop the policy set through the admin API: the config's applies again."""
        self.models.entry(name)
        self.router.set_policy(name, None)
        return self.traffic(name)

    def statistics(self, name: str = "", version: str = "") -> list[ModelStats]:
        """Statistics of that model version; of each of its versions serving without a
        version (as Triton answers); of every version serving without a name."""
        if name:
            if version:
                return [self.router.route(name, version).stats]
            entry = self.models.entry(name)
            return [entry.versions[v].stats for v in sorted(entry.versions)]
        return [
            entry.versions[v].stats
            for entry in self.models.models.values()
            for v in sorted(entry.versions)
        ]

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model in the repository (loaded or not), one line per version serving."""
        with contextlib.suppress(Exception):  # a repository that vanished lists what is known
            for name in self.models.discover():
                self.models.models.setdefault(name, ModelEntry(name))
        out = []
        for name in sorted(self.models.models):
            entry = self.models.models[name]
            if ready_only and entry.state is not State.READY:
                continue
            versions: list[int | None] = [*sorted(entry.versions)] or [None]
            for version in versions:
                out.append(IndexEntry(name, version, entry.state.value, entry.reason))
        return out

    async def load(self, name: str) -> None:
        """Load or reload a model; health is re-derived afterwards, whether it worked or not."""
        await self._change(self.models.load(name))

    async def unload(self, name: str) -> None:
        await self._change(self.models.unload(name))

    async def _change(self, change: Awaitable[None]) -> None:
        try:
            await change
        finally:
            if self.on_change is not None:
                await self.on_change()


def _probe(request: InferRequest, mv: ModelVersion) -> Probe | None:
    """The request's telemetry probe, told which model version serves it."""
    probe = request.probe
    if probe is not None:
        probe.model, probe.version = mv.name, str(mv.version)
    return probe


def _finish(task: asyncio.Task, done: Done) -> None:
    if task.cancelled():
        done(None, Cancelled("the caller went away"))
    elif (error := task.exception()) is not None:
        done(None, error)
    else:
        done(task.result(), None)
