"""The one rule that decides which implementation runs an op (which backends exist for which op is the op table,
:mod:`fastmask.ops.table`).

Order of precedence: the ``backend=`` argument, then the ``FASTMASK_BACKEND`` environment variable, then the
automatic choice. Backends:

- ``reference``: :mod:`fastmask.ops.reference`, pure PyTorch, runs anywhere.
- ``cpp``: the C++/OpenMP kernels of ``fastmask._C`` for CPU tensors.
- ``cuda``: the CUDA kernels of ``fastmask._C`` (built with FASTMASK_BUILD_CUDA=1) for CUDA tensors.
- ``triton``: the Triton kernels in ``fastmask.kernels`` for CUDA tensors; on CPU tensors only under the Triton
  interpreter (``TRITON_INTERPRET=1``), which is how they are tested on machines without a GPU.

Automatic choice: CPU tensors → cpp, CUDA tensors → cuda where the op has a CUDA kernel, else triton; anything
else → reference. An
explicit request that cannot be met raises; an automatic choice that has to fall back says so once.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from fastmask.ops.table import BACKENDS, backends

ENV_VAR = "FASTMASK_BACKEND"

log = logging.getLogger(__name__)


@functools.cache
def _extension_error() -> str | None:
    """Why fastmask._C cannot be used, or None when it loads."""
    try:
        import fastmask._C  # noqa: F401  (loading the library registers torch.ops.fastmask.*)
    except ImportError as exc:
        return f"fastmask._C is not built ({exc}); run `pip install --no-build-isolation -e .`"
    return None


def _cuda_kernels_built() -> bool:
    if _extension_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastmask::radix_histogram", "CUDA")


@functools.cache
def _triton_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, op: str, device: torch.device) -> str | None:
    """None if ``backend`` can run ``op`` on ``device`` tensors, else a sentence saying why not."""
    if backend == "reference":
        return None
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS}"
    if backend not in backends(op):
        return f"backend {backend!r} has no {op} kernel"
    if backend == "cpp":
        if device.type != "cpu":
            return f"backend 'cpp' runs on CPU tensors, got {device.type}"
        return _extension_error()
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got {device.type}"
        return None if _cuda_kernels_built() else "fastmask._C was built without CUDA (FASTMASK_BUILD_CUDA=1)"
    # triton
    if _triton_error() is not None:
        return _triton_error()
    if device.type == "cpu" and not interpreting():
        return "backend 'triton' runs CPU tensors only under the interpreter (set TRITON_INTERPRET=1 before import)"
    if device.type not in ("cpu", "cuda"):
        return f"backend 'triton' does not run on {device.type} tensors"
    return None


@functools.cache
def _warn_fallback_once(op: str, device_type: str, wanted: str, reason: str) -> None:
    log.warning("fastmask: %s on %s tensors falls back to the reference backend: %s", op, device_type, reason)


# Under torch.compile the choice is made once, while tracing, and the compiled graph keeps it: a host decision with
# nothing to trace (and a cached import check inside that Dynamo would otherwise warn about).
@torch.compiler.assume_constant_result
def resolve(op: str, device: torch.device, requested: str | None = None) -> str:
    """The backend that runs ``op`` on ``device`` tensors."""
    choice = requested or os.environ.get(ENV_VAR) or "auto"
    if choice != "auto":
        reason = unavailable_reason(choice, op, device)
        if reason is not None:
            source = "backend=" if requested else f"{ENV_VAR}="
            raise RuntimeError(f"fastmask: {source}{choice!r} cannot run {op}: {reason}")
        return choice
    if device.type == "cpu":
        preferred = "cpp"
    elif device.type == "cuda":
        preferred = "cuda" if "cuda" in backends(op) else "triton"
    else:
        return "reference"
    reason = unavailable_reason(preferred, op, device)
    if reason is None:
        return preferred
    _warn_fallback_once(op, device.type, preferred, reason)
    return "reference"
