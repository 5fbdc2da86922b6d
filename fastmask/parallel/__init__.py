"""Multi-process SWiFT / BMFT: data parallelism with the global batch's loss (:mod:`~fastmask.parallel.ddp`),
FSDP2-sharded parameters (:mod:`~fastmask.parallel.fsdp`) and the exact percentile across ranks
(:mod:`~fastmask.parallel.percentile`). Imports only :mod:`fastmask.ops` and :mod:`fastmask.util`; without an
initialised process group every function is the one-process identity."""
