"""The one error of the load generator: a setting or a model it cannot work with."""

__all__ = ["BenchError"]


class BenchError(Exception):
    """A setting or a model the generator cannot work with; the message says which."""
