"""The one error of `salvo batch` before any row is sent: a flag, a file or a model it
cannot work with (exit status 2)."""

__all__ = ["BatchError", "missing_extra"]


class BatchError(Exception):
    """A setting, an input or a model the job cannot work with; the message says which and
    what to do about it."""


def missing_extra(package: str, what: str) -> BatchError:
    """The error for an optional dependency of the `batch` extra that is not installed."""
    return BatchError(f"{what} needs {package}: pip install 'salvo[batch]'")
