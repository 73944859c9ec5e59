"""Errors shared across layers (a leaf module: it imports nothing of apd_ext).

FatalDeviceError marks an exception after which this process's device (its
CUDA context) can no longer be trusted: the Engine does not try to contain it
per request, and a server replica that sees one reports itself unhealthy so
that Ray Serve replaces it."""
from __future__ import annotations


class FatalDeviceError(RuntimeError):
    """The device is unusable (a sticky CUDA error, a lost device)."""


# Substrings of the messages torch raises for sticky CUDA / driver errors: after
# one of them every later kernel launch of the process fails too, so retrying
# or bisecting the batch cannot help (a CUDA out-of-memory error is not among
# them: it is per allocation and recoverable).
_FATAL_MARKERS = (
    "CUDA error", "device-side assert", "illegal memory access", "unspecified launch failure",
    "CUBLAS_STATUS_EXECUTION_FAILED", "CUBLAS_STATUS_INTERNAL_ERROR", "CUDNN_STATUS_EXECUTION_FAILED",
    "NCCL error", "uncorrectable ECC error", "GPU has fallen off the bus",
)


def is_fatal(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) marks the device as
    unusable: a FatalDeviceError, anything with a true `fatal` attribute, or a
    message of a sticky CUDA error (torch raises those as plain RuntimeError /
    torch.AcceleratorError, "CUDA error: ..."), but never CUDA out of memory."""
    seen = set()
    e = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, FatalDeviceError) or getattr(e, "fatal", False) is True:
            return True
        msg = str(e)
        if "out of memory" not in msg and any(m in msg for m in _FATAL_MARKERS):
            return True
        e = e.__cause__ or e.__context__
    return False


class Rejected(RuntimeError):
    """A server refused to admit a request (nothing of it ran). status: the
    HTTP status to answer (429 queue full, 503 draining or unhealthy);
    retry_after: seconds for the Retry-After header; reason: the metrics label."""

    def __init__(self, message: str, status: int, reason: str, retry_after: int = 1):
        super().__init__(message)
        self.status, self.reason, self.retry_after = status, reason, retry_after


class RequestFailed(RuntimeError):
    """An admitted request ended without a result (its row failed, the replica
    hit a fatal error, or the drain deadline passed)."""


class UsageError(Exception):
    """A problem with the command line or its inputs (`apd ...`, `apd serve`,
    the tiny demo: exit status 2, one line naming the flag)."""
