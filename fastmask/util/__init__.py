"""Utilities every layer may use and that use nothing of fastmask: named profiler / NVTX ranges
(:mod:`~fastmask.util.profiling`), atomic file output (:mod:`~fastmask.util.files`), peak-memory watches
(:mod:`~fastmask.util.memory`) and memory-layout predicates (:mod:`~fastmask.util.layout`)."""
