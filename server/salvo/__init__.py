"""Salvo: a high-throughput gRPC inference server for PyTorch models."""

__version__ = "0.1.0"
