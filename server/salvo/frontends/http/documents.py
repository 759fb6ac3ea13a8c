"""The v2 JSON documents that are not inferences: server and model metadata, model config,
statistics and the repository index, written as Triton writes them (numbers as numbers,
the config in Triton's model-config field names), from the data plane's answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from salvo.core.dataplane import IndexEntry, ModelInfo
from salvo.domain.config import ModelConfig
from salvo.domain.datatypes import DATATYPES
from salvo.domain.protocol import EXTENSIONS, PLATFORM, SERVER_NAME, SERVER_VERSION
from salvo.domain.stats import Duration, ModelStats


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}


def model_metadata(info: ModelInfo) -> dict[str, Any]:
    """Shapes with -1 for the batch dimension where the model has one."""
    batch = [-1] if info.config.max_batch_size > 0 else []

    def tensors(specs: Sequence[Any]) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": s.datatype, "shape": [*batch, *s.dims]} for s in specs]

    return {
        "name": info.name,
        "versions": [str(v) for v in info.versions],
        "platform": PLATFORM,
        "inputs": tensors(info.config.inputs),
        "outputs": tensors(info.config.outputs),
    }


def model_config(config: ModelConfig, device_type: str) -> dict[str, Any]:
    """The config as Triton's model config JSON (what perf_analyzer reads over HTTP)."""

    def tensors(specs: Sequence[Any]) -> list[dict[str, Any]]:
        return [
            {
                "name": s.name,
                "data_type": DATATYPES[s.datatype].config_enum,
                "dims": list(s.dims),
            }
            for s in specs
        ]

    policy = config.version_policy
    if policy.all:
        version_policy: dict[str, Any] = {"all": {}}
    elif policy.specific is not None:
        version_policy = {"specific": {"versions": list(policy.specific)}}
    else:
        version_policy = {"latest": {"num_versions": policy.latest or 1}}
    out: dict[str, Any] = {
        "name": config.name,
        "platform": PLATFORM,
        "backend": "pytorch",
        "max_batch_size": config.max_batch_size,
        "input": tensors(config.inputs),
        "output": tensors(config.outputs),
        "instance_group": [
            {
                "name": config.name,
                "count": config.instance_count,
                "kind": "KIND_GPU" if device_type == "cuda" else "KIND_CPU",
            }
        ],
        "version_policy": version_policy,
    }
    batching = config.dynamic_batching
    if batching is not None and config.max_batch_size > 0:
        out["dynamic_batching"] = {
            "preferred_batch_size": list(batching.preferred_batch_sizes),
            "max_queue_delay_microseconds": batching.max_queue_delay_us,
            "priority_levels": batching.priority_levels,
            "default_priority_level": batching.default_priority_level,
            "default_queue_policy": {
                "default_timeout_microseconds": batching.default_timeout_us,
                "allow_timeout_override": batching.allow_timeout_override,
                "max_queue_size": batching.max_queue_size,
            },
        }
    if config.response_cache.enable:
        out["response_cache"] = {"enable": True}
    if config.parameters:
        out["parameters"] = {k: {"string_value": v} for k, v in config.parameters.items()}
    return out


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def statistics(stats: Sequence[ModelStats]) -> dict[str, Any]:
    """Each version's statistics (`salvo.domain.stats` says what each field counts)."""
    names = (
        "success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
        "cache_hit", "cache_miss",
    )  # fmt: skip
    return {
        "model_stats": [
            {
                "name": s.name,
                "version": str(s.version),
                "last_inference": s.last_inference_ms,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {n: _duration(getattr(s, n)) for n in names},
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": _duration(s.batches[size].compute_input),
                        "compute_infer": _duration(s.batches[size].compute_infer),
                        "compute_output": _duration(s.batches[size].compute_output),
                    }
                    for size in sorted(s.batches)
                ],
            }
            for s in stats
        ]
    }


def index(entries: Sequence[IndexEntry]) -> list[dict[str, Any]]:
    return [
        {
            "name": e.name,
            **({"version": str(e.version)} if e.version is not None else {}),
            "state": e.state,
            "reason": e.reason,
        }
        for e in entries
    ]
