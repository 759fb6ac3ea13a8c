"""Model configuration: `<repo>/<model>/config.yaml` (or `.json`) parsed into frozen models.

The vocabulary follows Triton's (max_batch_size, dims with -1, instance count, dynamic
batching), written in Salvo's own compact YAML. Every error names the file and the field.

    max_batch_size: 128
    inputs:  [{name: input, datatype: FP32, dims: [64]}]
    outputs: [{name: output, datatype: FP32, dims: [10]}]
    device: auto          # auto | cpu | cuda | cuda:N
    instance_count: 1
    optimization: {precision: fp16, channels_last: true}   # fp32 | fp16 | bf16
    # optimization.cuda_graphs, optimization.compile, optimization.freeze: off unless asked for
    # optimization.execution: auto | thread | loop (where batches run)
    traffic: {weights: {1: 90, 2: 10}}   # requests naming no version: 90% v1, 10% v2
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from salvo.domain.datatypes import DATATYPES
from salvo.domain.status import ConfigError

CONFIG_NAMES = ("config.yaml", "config.yml", "config.json")
# Model names are single path segments: letters, digits, '_', '-', '.', never '.' or '..'.
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


def valid_model_name(name: str) -> bool:
    """Whether `name` can name a model: a plain directory name that cannot escape the repo."""
    return bool(NAME_RE.match(name)) and name not in (".", "..") and ".." not in name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorConfig(_Strict):
    """One input or output: its name, v2 datatype and dims (without the batch dimension)."""

    name: str = Field(min_length=1)
    datatype: str
    dims: tuple[int, ...]

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in DATATYPES:
            raise ValueError(f"unknown datatype {value!r}; expected one of {', '.join(DATATYPES)}")
        return value

    @field_validator("dims")
    @classmethod
    def _dims(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(d == 0 or d < -1 for d in value):
            raise ValueError(f"dims must be positive or -1, got {list(value)}")
        return value


class DynamicBatchingConfig(_Strict):
    """Triton's dynamic_batching block; times in microseconds."""

    max_queue_delay_us: int = Field(default=0, ge=0)
    """Longest a request waits for a fuller batch while every instance is busy."""
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = Field(default=0, ge=0)
    """Requests queued at most; 0 means unbounded."""
    default_timeout_us: int = Field(default=0, ge=0)
    """A request still queued after this long is answered DEADLINE_EXCEEDED; 0: none."""
    allow_timeout_override: bool = False
    priority_levels: int = Field(default=0, ge=0)
    default_priority_level: int = Field(default=0, ge=0)
    hold_for_returns: Literal["bounded", "until_quiet"] = "bounded"
    """How long a free instance holds a batch that is not full for rows it expects back
    (each answered row, until a request arrives for it). `bounded`: at most
    max_queue_delay_us from when the batch could have gone; a hold that times out forgets
    what it expected. `until_quiet`, for callers in a closed loop (a fixed pool of
    workers, each waiting for its answer before it sends again): the hold lasts while
    rows keep arriving, until none has arrived for max_queue_delay_us, and at most 10
    times that; and each answered batch expects one row more until that row fails to
    come, so the count finds every caller. No effect with preferred_batch_sizes (those
    batches never hold for returns). On `mlp` on 2 cores, `until_quiet` fills batches of
    12 to 15 rows where `bounded` runs 2, for about 1.05 to 1.1 times the throughput at
    16 and 64 callers but 0.86 at 4, and it adds 0.6 to 1.2 ms to the median for
    independent requests at 500 and 1,000 a second (`make bench-hold`). Hence not the
    default."""


class ResponseCacheConfig(_Strict):
    """Triton's response_cache block: whether this model's responses may be cached."""

    enable: bool = False


class OptimizationConfig(_Strict):
    """How the model runs: precision, memory layout, warm-up (all applied once, at load)."""

    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """The floating-point precision the model computes in. Weights are converted at load,
    floating-point inputs on their way in, and outputs back to their declared datatype,
    so clients see the same contract at any precision."""
    channels_last: bool = False
    """Convolutional models: weights and 4-D inputs in channels-last layout (NHWC), which
    the fast convolution kernels on GPUs and recent CPUs prefer."""
    warmup: bool = True
    """Run a forward pass of zeros at load at batch size 1, each preferred size and the
    maximum, so the first requests pay no kernel selection or allocation."""
    cuda_graphs: bool = False
    """On CUDA: capture each instance's forward pass as a CUDA graph at load, one per batch
    size bucket (powers of two up to `max_batch_size`, each preferred size and the maximum),
    and replay it: one launch a batch instead of one per kernel. A batch runs in the
    smallest bucket that holds it, padded with zero rows whose outputs are dropped. Needs
    every input's dims fixed (no -1). Ignored on the CPU."""
    compile: bool = False
    """Run the model through `torch.compile` (TorchInductor), compiled at load by the
    warm-up passes. torch.export models (`model.pt2`) only: TorchScript has its own JIT.
    On the CPU, TorchInductor fixes the intra-op thread count (`--torch-threads`) into the
    kernels it compiles, so a compiled model runs on that many threads even on the event
    loop (`execution`), where uncompiled models run on one."""
    freeze: bool = False
    """TorchScript models (`model.pt`): freeze the module and pass it through
    `torch.jit.optimize_for_inference` at load, so that weights become constants, batch
    norms fold into the convolutions before them and, on the CPU, convolution weights are
    pre-packed for oneDNN: the demo `resnet` serves 1.2× as many requests a second on a
    2-core CPU (`make bench-freeze`). Answers may differ from the unfrozen
    model's in the last bits. torch.export models (`model.pt2`) are refused: `compile` is
    theirs."""
    execution: Literal["auto", "thread", "loop"] = "auto"
    """Where batches run. `thread`: on the instance's own thread, so the event loop serves
    other calls meanwhile. `loop`: on the event loop itself, which saves the two thread
    hand-overs per batch (most of a fast model's per-batch cost under Python's GIL) but
    holds every other call up while it runs. `auto`: the loop for a CPU model with one
    instance whose largest batch took under 2 ms at warm-up (it moves to its thread for
    good once batches in a row, failed or not, have held the loop up for over 4 ms each,
    three of them at least and for a quarter of a second: shorter runs are the machine's
    hiccups), else the thread; without warm-up, the thread. A forward pass that never
    returns stops a model on the loop and every other call with it: `loop` is for models
    known to be fast. Several models on the loop run one after another, not side by side.
    On the loop a batch runs on one torch thread (`backend.one_torch_thread`); on instance
    threads, on `--torch-threads`."""


class ShadowConfig(_Strict):
    """A candidate version that a share of the requests also runs on, compared with the
    version that answered them and never returned (`salvo.core.shadow`)."""

    version: int = Field(ge=1)
    share: float = Field(default=1.0, ge=0, le=1)


class TrafficConfig(_Strict):
    """How requests that name no version are spread over the model's versions (a request
    that names one gets it).

        traffic: {weights: {1: 90, 2: 10}, sticky_parameter: user,
                  shadow: {version: 3, share: 0.1}}

    `weights`: each version's share, in proportion to the sum of those serving (a version
    not serving takes none; none serving, or no weights: the latest version).
    `sticky_parameter`: a request parameter whose value keeps a caller on one version:
    the same value lands on the same version for as long as the weights stay the same.
    Requests without it are spread at random by the weights. `shadow`: a `share` of the
    requests that name no version also run on `version`, compared and never returned.
    The admin API
    (`/v2/models/{model}/traffic`, `salvo traffic`) replaces this while the server runs."""

    weights: dict[int, float] = {}
    sticky_parameter: str | None = Field(default=None, min_length=1)
    shadow: ShadowConfig | None = None

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[int, float]) -> dict[int, float]:
        for version, weight in value.items():
            if version < 1:
                raise ValueError(f"versions are positive integers, got {version}")
            if not 0 <= weight < float("inf"):
                raise ValueError(f"version {version}: a weight is a finite number >= 0")
        if value and not any(value.values()):
            raise ValueError("at least one weight must be above 0")
        return value


class VersionPolicy(_Strict):
    """Which versions serve: the `latest` N (default 1), `all`, or a `specific` list."""

    latest: int | None = Field(default=None, ge=1)
    all: bool = False
    specific: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _one_choice(self) -> VersionPolicy:
        chosen = sum([self.latest is not None, self.all, self.specific is not None])
        if chosen > 1:
            raise ValueError("choose one of latest, all, specific")
        return self

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of `available`, ascending."""
        ordered = sorted(available)
        if self.all:
            return ordered
        if self.specific is not None:
            return [v for v in ordered if v in self.specific]
        return ordered[-(self.latest or 1) :]


class ModelConfig(_Strict):
    """A model's whole configuration."""

    name: str
    max_batch_size: int = Field(default=0, ge=0)
    inputs: tuple[TensorConfig, ...] = Field(min_length=1)
    outputs: tuple[TensorConfig, ...] = Field(min_length=1)
    device: str = "auto"
    instance_count: int = Field(default=1, ge=1, le=64)
    """Copies of the model that run batches at once, each on its own thread (on CUDA, its
    own stream). On the CPU they share the intra-op threads (`--torch-threads`): a batch
    runs on those threads divided by the instances busy when it starts, so one instance
    alone has every core and two busy at once have half each (`compile` models excepted:
    TorchInductor builds the thread count into its kernels)."""
    dynamic_batching: DynamicBatchingConfig | None = None
    version_policy: VersionPolicy = VersionPolicy()
    response_cache: ResponseCacheConfig = ResponseCacheConfig()
    optimization: OptimizationConfig = OptimizationConfig()
    traffic: TrafficConfig = TrafficConfig()
    parameters: dict[str, str] = {}

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_instance_on_the_loop(self) -> ModelConfig:
        if self.optimization.execution == "loop" and self.instance_count > 1:
            raise ValueError(
                "optimization.execution 'loop' runs one batch at a time: instance_count must "
                f"be 1, got {self.instance_count}"
            )
        return self

    @model_validator(mode="after")
    def _graphs_need_fixed_dims(self) -> ModelConfig:
        if self.optimization.cuda_graphs:
            for spec in self.inputs:
                if any(d < 0 for d in spec.dims):
                    raise ValueError(
                        f"optimization.cuda_graphs needs fixed input dims: input "
                        f"{spec.name!r} has dims {list(spec.dims)}"
                    )
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> ModelConfig:
        for kind, tensors in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [t.name for t in tensors]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"duplicate {kind} name(s): {', '.join(dupes)}")
        return self

    def input(self, name: str) -> TensorConfig | None:
        """The input called `name`, or None."""
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorConfig | None:
        """The output called `name`, or None."""
        return next((t for t in self.outputs if t.name == name), None)


def find_config_file(model_dir: Path) -> Path | None:
    """The config file of the model in `model_dir`, or None."""
    for name in CONFIG_NAMES:
        path = model_dir / name
        if path.is_file():
            return path
    return None


def load_config(model_dir: Path) -> ModelConfig:
    """Parse and validate the config of the model in `model_dir`.

    Raises ConfigError naming the file and the offending field.
    """
    path = find_config_file(model_dir)
    if path is None:
        raise ConfigError(
            f"{model_dir}: no config file (expected one of {', '.join(CONFIG_NAMES)})"
        )
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw.setdefault("name", model_dir.name)
    if raw["name"] != model_dir.name:
        raise ConfigError(
            f"{path}: field 'name': {raw['name']!r} does not match the directory {model_dir.name!r}"
        )
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{path}: field '{field}': {message}{more}") from None


def write_config(model_dir: Path, config: ModelConfig) -> Path:
    """Write `config` as `model_dir/config.yaml`."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.yaml"
    data = config.model_dump(mode="json", exclude_defaults=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
