"""What Salvo says of itself in the v2 protocol, the same over every transport."""

from __future__ import annotations

from salvo import __version__

SERVER_NAME = "salvo"
SERVER_VERSION = __version__
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "binary_tensor_data")
"""The v2 extensions served (Triton's names): repository index, load and unload; model
config; statistics; binary tensor data over HTTP (raw contents over gRPC)."""
PLATFORM = "pytorch_libtorch"
"""The platform every model reports (Triton's name for a PyTorch model)."""
