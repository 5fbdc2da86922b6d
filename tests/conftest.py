"""Test set-up. Without a CUDA device the Triton kernels run in the interpreter on CPU tensors; TRITON_INTERPRET
must be set before any @triton.jit function is defined, so it is set here, before fastmask.kernels is imported."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.errors import InvalidArgument
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Property tests explore new examples on every local run (a failing one is kept in .hypothesis/ and replayed first);
# under CI (CI set, as .ci/run does) they draw the same examples every time, so a landing never hinges on luck.
# Recent Hypothesis registers and loads such a "ci" profile itself when it sees CI; older releases get this one.
try:
    settings.get_profile("ci")
except InvalidArgument:
    settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    if os.environ.get("CI"):
        settings.load_profile("ci")


def op_backends(op: str) -> tuple[str, ...]:
    """The backends the op table (fastmask.ops.table) lists for ``op`` that run on this machine, "reference" first:
    an op test is parametrised over these. "cuda" needs a CUDA device; "triton" runs CUDA tensors, or CPU tensors
    in the interpreter (TRITON_INTERPRET=1, set above). Whether the C++ extension is built is not asked here: a
    missing build must fail the "cpp" tests, not drop them."""
    from fastmask.ops.table import backends  # after TRITON_INTERPRET is set

    return tuple(b for b in backends(op) if b != "cuda" or torch.cuda.is_available())


def backend_device(backend: str) -> torch.device:
    """The device of the tensors an op test gives ``backend``: CUDA for "cuda" (and for "triton" where there is a
    CUDA device, as the interpreter is off there), else the CPU."""
    on_gpu = backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
    return torch.device("cuda" if on_gpu else "cpu")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): the
    fastest for them, and immune to a busy machine's OpenMP contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def linear(seed: int = 0) -> nn.Module:
    """A seeded two-layer MLP on 3×2×2 inputs with one logit. No BN, no dropout: train mode equals eval mode, so a
    step's loss can be recomputed exactly."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 4), nn.Tanh(), nn.Linear(4, 1))
