"""What the job knows of the model, all of it read from the server: input and output names,
datatypes and dims, whether it batches and how many rows at most, its versions, and the
string `parameters` of its config (where image preprocessing is declared)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from salvo_client.batch.errors import BatchError
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import model_config_pb2 as mc
from salvo_client.tensors import WIRE_DTYPES

__all__ = ["ModelSpec", "TensorSpec", "model_spec"]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output: `dims` are one row's, without the batch dimension (-1: any)."""

    name: str
    datatype: str
    dims: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype values of this tensor are held in (object for BYTES)."""
        return WIRE_DTYPES[self.datatype]

    @property
    def fixed(self) -> bool:
        """Whether every dim is known, so a row's element count says its shape."""
        return all(d >= 0 for d in self.dims)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "dims": list(self.dims)}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model version as the server describes it."""

    name: str
    versions: tuple[str, ...]
    max_batch_size: int
    """0: the model takes no batch dimension, so each request carries one row."""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: Mapping[str, str] = field(default_factory=dict)

    @property
    def batches(self) -> bool:
        return self.max_batch_size > 0

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def select_outputs(self, names: Sequence[str] | None) -> tuple[TensorSpec, ...]:
        """The outputs asked for (all when `names` is None), in the model's order."""
        if names is None:
            return self.outputs
        known = {t.name for t in self.outputs}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise BatchError(
                f"model '{self.name}' has no output {', '.join(map(repr, unknown))} "
                f"(outputs: {', '.join(sorted(known))})"
            )
        return tuple(t for t in self.outputs if t.name in names)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed job must find unchanged for its earlier answers to still hold."""
        return {
            "name": self.name,
            "versions": list(self.versions),
            "inputs": [t.describe() for t in self.inputs],
            "outputs": [t.describe() for t in self.outputs],
        }


def _tensors(
    tensors: Sequence[pb.ModelMetadataResponse.TensorMetadata], batches: bool, model: str
) -> tuple[TensorSpec, ...]:
    specs = []
    for t in tensors:
        if t.datatype not in WIRE_DTYPES:
            raise BatchError(f"model '{model}': tensor '{t.name}' has datatype {t.datatype!r}")
        shape = tuple(int(d) for d in t.shape)
        # A batching model's metadata shape leads with its batch dimension.
        specs.append(TensorSpec(t.name, t.datatype, shape[1:] if batches and shape else shape))
    return tuple(specs)


def model_spec(metadata: pb.ModelMetadataResponse, config: mc.ModelConfig) -> ModelSpec:
    """The ModelSpec of a model from its ModelMetadata (names, datatypes, shapes, versions)
    and its ModelConfig (max_batch_size, parameters)."""
    batches = config.max_batch_size > 0
    inputs = _tensors(metadata.inputs, batches, metadata.name)
    for spec in inputs:
        if spec.datatype == "BF16":
            raise BatchError(
                f"model '{metadata.name}': input '{spec.name}' is BF16, which numpy cannot hold"
            )
    return ModelSpec(
        name=metadata.name,
        versions=tuple(metadata.versions),
        max_batch_size=int(config.max_batch_size),
        inputs=inputs,
        outputs=_tensors(metadata.outputs, batches, metadata.name),
        parameters={key: p.string_value for key, p in config.parameters.items()},
    )
