"""The op table: every per-parameter op of fastmask, the backends that implement it, and where each lives.

This table is the one owner of those facts. Backend resolution (:mod:`fastmask.ops.backend`), the dispatch in
:mod:`fastmask.ops`, the fake (meta) kernels (:mod:`fastmask.ops.fakes`), the tests (parametrised over
:func:`backends`) and the layout test (which checks that every file named here exists) all read it.

One op, one name everywhere. For the op ``<name>`` with file stem ``<stem>``:

==========  =======================================================================
reference   ``fastmask/ops/reference.py::<name>`` (pure PyTorch: fallback and test oracle; the papers' way)
cpp         ``csrc/<stem>.cpp`` (CPU, OpenMP), registered as ``torch.ops.fastmask.<name>``
cuda        ``csrc/cuda/<stem>_kernels.cu`` + ``csrc/cuda/<stem>_cuda.cpp``, the same ``torch.ops`` name
triton      ``kernels/<stem>.py::<name>`` (installed as ``fastmask.kernels.<stem>``)
test        ``tests/test_<stem>.py``
bench       ``bench/bench_<stem>.py``
==========  =======================================================================

``percentile`` is composed: its fused form is the radix selection of :mod:`fastmask.ops.radix`, one
``radix_histogram`` launch per pass, so it runs wherever ``radix_histogram`` has a kernel; its reference is
``np.percentile`` over the concatenated tensors (the papers' way).
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("reference", "cpp", "cuda", "triton")


@dataclass(frozen=True)
class Op:
    """One op: its ``name`` (the Python / ``torch.ops.fastmask`` name), its file ``stem`` and its ``backends``
    (``"reference"`` first: every op has one). ``schema``: the op is declared in ``csrc/ops.cpp`` (it has a fake
    kernel for tracing). ``uses``: a composed op runs this op's kernels instead of its own."""

    name: str
    stem: str
    backends: tuple[str, ...]
    schema: bool = True
    uses: str | None = None

    @property
    def profile_range(self) -> str:
        """The NVTX / torch.profiler range every call of the op opens."""
        return f"fastmask.{self.stem}"


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("fisher_accumulate_", "fisher_accumulate", ("reference", "cpp", "triton")),
        Op("soft_mask", "soft_mask", ("reference", "cpp", "triton")),
        Op("soft_mask_", "soft_mask", ("reference", "cpp", "triton")),
        Op("masked_adam_", "masked_adam", ("reference", "cpp", "triton")),
        Op("masked_sgd_", "masked_sgd", ("reference", "cpp", "triton")),
        Op("radix_histogram", "radix_histogram", ("reference", "cpp", "cuda")),
        Op("hard_mask", "hard_mask", ("reference", "cpp", "cuda")),
        Op("percentile", "percentile", ("reference", "cpp", "cuda"), schema=False, uses="radix_histogram"),
    )
}


def op(name: str) -> Op:
    """The table entry of ``name``; an unknown name is an error that lists the ops."""
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"fastmask has no op {name!r}; its ops are {list(OPS)}") from None


def backends(name: str) -> tuple[str, ...]:
    """The backends that implement op ``name`` (``"reference"`` first)."""
    return op(name).backends
