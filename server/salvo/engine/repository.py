"""The model repository on disk and the models loaded from it.

`<repo>/<model>/config.yaml` plus `<repo>/<model>/<version>/model.pt|model.pt2`. The
ModelManager loads, reloads and unloads models while others keep serving: a reload builds
the new versions first and swaps them in, so a failed reload leaves the old ones serving.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from salvo.domain.config import ModelConfig, find_config_file, load_config, valid_model_name
from salvo.domain.stats import ModelStats
from salvo.domain.status import ConfigError, InvalidRequest, ModelNotFound, ModelUnavailable
from salvo.engine.backend import LoadedModel
from salvo.engine.scheduler import Scheduler
from salvo.engine.threads import inherit_torch_threads
from salvo.observability.telemetry import Telemetry

log = logging.getLogger(__name__)

ModelLoader = Callable[[ModelConfig, Path], LoadedModel]


class State(enum.Enum):
    """A model's state, as RepositoryIndex reports it."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(eq=False)
class ModelVersion:
    """One loaded version: its model, its scheduler and its statistics."""

    name: str
    version: int
    config: ModelConfig
    model: LoadedModel
    scheduler: Scheduler
    stats: ModelStats

    @property
    def device_type(self) -> str:
        """Where it runs: "cpu" or "cuda" (which `device: auto` leaves open until load)."""
        return self.model.device.type


@dataclass(eq=False)
class ModelEntry:
    """Everything the server knows of one model name."""

    name: str
    state: State = State.UNAVAILABLE
    reason: str = ""
    config: ModelConfig | None = None
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    load_seconds: float = 0.0
    wanted: bool = True
    """False once unloaded on request: readiness no longer waits for it."""

    def latest(self) -> ModelVersion | None:
        return self.versions[max(self.versions)] if self.versions else None

    def version(self, version: str) -> ModelVersion:
        """The version a caller named (a decimal number). Raises NOT_FOUND."""
        # ASCII only: str.isdigit() also takes "²", which int() refuses, and "١".
        if not (version.isascii() and version.isdigit()):
            raise ModelNotFound(f"model '{self.name}' has no version {version!r}")
        mv = self.versions.get(int(version))
        if mv is None:
            raise ModelNotFound(
                f"model '{self.name}' has no version {version} (serving {sorted(self.versions)})"
            )
        return mv


def list_versions(model_dir: Path) -> list[int]:
    """Version numbers: the all-digit subdirectories of a model directory."""
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


class ModelManager:
    """Loads models from the repository and hands out the version a request names."""

    def __init__(
        self,
        root: Path,
        loader: ModelLoader = LoadedModel.load,
        on_swap: Callable[[str], object] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.root = root
        self.telemetry = telemetry
        self.on_swap = on_swap
        """Called with a model's name whenever its versions change (the cache drops them)."""
        self.loader = loader
        """Turns a config and a version directory into a model (a seam for test models)."""
        self.models: dict[str, ModelEntry] = {}
        """Every model known, by name (the one dict for the life of the manager)."""
        self._locks: dict[str, asyncio.Lock] = {}
        self._loaded_from: dict[str, tuple[object, ...]] = {}
        """Each model's repository signature when it was last loaded (`poll`)."""

    def discover(self) -> list[str]:
        """Model names in the repository: directories with a valid name."""
        if not self.root.is_dir():
            raise ConfigError(f"{self.root}: model repository not found")
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and valid_model_name(p.name)
        )

    def _signature(self, name: str) -> tuple[object, ...]:
        """What a reload would read differently: the config file and each version
        directory's files (names, sizes, modification times)."""
        model_dir = self.root / name
        try:
            versions = list_versions(model_dir)
            files = [] if (path := find_config_file(model_dir)) is None else [path]
            for version in versions:
                files.extend(p for p in (model_dir / str(version)).iterdir() if p.is_file())
            return (tuple(versions), *(
                (str(p.relative_to(model_dir)), (st := p.stat()).st_size, st.st_mtime_ns)
                for p in sorted(files)
            ))  # fmt: skip
        except OSError:
            return ()

    async def poll(self) -> list[str]:
        """Bring the models in line with the repository (`--repository-poll-s`): load a new
        model directory, reload one whose versions or config changed since it was loaded,
        unload one whose directory went. A model unloaded on request stays unloaded.
        Returns the names acted on. Each load warms the new versions up before they take
        traffic, and a failed one leaves the versions serving as they were."""
        try:
            present = set(self.discover())
        except ConfigError as exc:
            log.error("repository poll: %s", exc)
            return []
        acted = []
        for name in sorted(present):
            entry = self.models.get(name)
            if entry is not None and not entry.wanted:
                continue
            if entry is None or self._loaded_from.get(name) != self._signature(name):
                acted.append(name)
                await self.load(name, quiet=True)
        for name in sorted(set(self.models) - present):
            if self.models[name].wanted:
                acted.append(name)
                await self.unload(name)
        if acted:
            log.info("repository poll: %s", ", ".join(acted))
        return acted

    async def load_all(self) -> None:
        """Load every model in the repository, concurrently; failures are recorded per model."""
        names = self.discover()
        for name in names:
            self.models.setdefault(name, ModelEntry(name, State.LOADING))
        await asyncio.gather(*(self.load(name, quiet=True) for name in names))

    def all_ready(self) -> bool:
        """True once every model in the repository loaded (Triton's strict readiness)."""
        return all(e.state is State.READY for e in self.models.values() if e.wanted)

    def check_name(self, name: str) -> None:
        if not valid_model_name(name):
            raise InvalidRequest(
                f"invalid model name {name!r}: a model name is one path segment of letters, "
                "digits, '_', '-' and '.'"
            )

    async def load(self, name: str, quiet: bool = False) -> None:
        """Load or reload `name`. Raises ModelNotFound or ModelUnavailable (unless quiet)."""
        self.check_name(name)
        model_dir = self.root / name
        if not model_dir.is_dir():
            raise ModelNotFound(f"model '{name}' is not in the repository")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            entry = self.models.setdefault(name, ModelEntry(name))
            entry.wanted = True
            previous = dict(entry.versions)
            signature = self._signature(name)
            self._loaded_from[name] = signature  # a failed load is not retried until it changes
            if not previous:
                entry.state = State.LOADING
            started = time.monotonic()
            try:
                # Loaded (and warmed up, and timed: see execution: auto) on torch's
                # thread count of the loop's thread, which runs a model's batches or
                # hands it on to its instance threads.
                same_threads = inherit_torch_threads()

                def load() -> dict[int, ModelVersion]:
                    same_threads()
                    return self._load_versions(name, model_dir)

                versions = await asyncio.to_thread(load)
            except ConfigError as exc:
                entry.reason = str(exc)
                if not previous:
                    entry.state = State.UNAVAILABLE
                log.error("load of model '%s' failed: %s", name, exc)
                if quiet:
                    return
                raise ModelUnavailable(f"failed to load model '{name}': {exc}") from None
            for mv in versions.values():
                await mv.scheduler.start()
            entry.config = next(iter(versions.values())).config
            entry.versions = versions
            if self.on_swap is not None:
                self.on_swap(name)
            entry.state = State.READY
            entry.reason = ""
            entry.load_seconds = time.monotonic() - started
            log.info(
                "loaded model '%s' versions %s in %.2f s",
                name,
                sorted(versions),
                entry.load_seconds,
            )
            for old in previous.values():
                await old.scheduler.stop()

    def _load_versions(self, name: str, model_dir: Path) -> dict[int, ModelVersion]:
        config = load_config(model_dir)
        available = list_versions(model_dir)
        chosen = config.version_policy.select(available)
        if not chosen:
            raise ConfigError(
                f"{model_dir}: no version to serve (found {available or 'none'}; "
                "versions are numbered subdirectories)"
            )
        versions = {}
        for version in chosen:
            model = self.loader(config, model_dir / str(version))
            stats = ModelStats(name, version)
            versions[version] = ModelVersion(
                name,
                version,
                config,
                model,
                Scheduler(model, stats, version, self.telemetry),
                stats,
            )
        return versions

    async def unload(self, name: str) -> None:
        """Unload `name`: new requests get UNAVAILABLE, queued ones finish first."""
        self.check_name(name)
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"model '{name}' is not in the repository")
        async with self._locks.setdefault(name, asyncio.Lock()):
            versions, entry.versions = entry.versions, {}
            if self.on_swap is not None:
                self.on_swap(name)
            entry.wanted = False
            entry.state = State.UNLOADING
            for mv in versions.values():
                await mv.scheduler.stop()
            entry.state = State.UNAVAILABLE
            entry.reason = "unloaded"
            log.info("unloaded model '%s'", name)

    def entry(self, name: str) -> ModelEntry:
        """The model called `name`, if it serves. Raises NOT_FOUND or UNAVAILABLE."""
        entry = self.models.get(name)
        if entry is None:
            self.check_name(name)
            raise ModelNotFound(f"unknown model '{name}'")
        if entry.state is not State.READY:
            why = f": {entry.reason}" if entry.reason else ""
            raise ModelUnavailable(f"model '{name}' is {entry.state.value.lower()}{why}")
        return entry

    def observe(self) -> list[tuple[str, float, dict[str, str]]]:
        """Queue depth, in-flight, readiness and load time per model, for the metrics layer."""
        out: list[tuple[str, float, dict[str, str]]] = []
        for name, entry in list(self.models.items()):
            labels = {"model": name}
            out.append(("ready", 1.0 if entry.state is State.READY else 0.0, labels))
            if entry.load_seconds:
                out.append(("load_s", entry.load_seconds, labels))
            for version, mv in list(entry.versions.items()):
                v = {"model": name, "version": str(version)}
                out.append(("queue_depth", float(len(mv.scheduler.queue)), v))
                out.append(("inflight", float(mv.scheduler.in_flight), v))
        return out

    def config_of(self, name: str) -> ModelConfig:
        """The config of a model, loaded or not; NOT_FOUND if unknown."""
        entry = self.models.get(name)
        if entry is None or entry.config is None:
            self.check_name(name)
            raise ModelNotFound(f"unknown model '{name}'")
        return entry.config

    async def stop(self) -> None:
        """Drain and stop every scheduler."""
        for entry in self.models.values():
            for mv in entry.versions.values():
                await mv.scheduler.stop()
