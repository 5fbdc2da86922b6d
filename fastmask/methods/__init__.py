"""The debiasing methods: SWiFT (:mod:`~fastmask.methods.swift`) and BMFT (:mod:`~fastmask.methods.bmft`), their
settings (:mod:`~fastmask.methods.configs`), the baselines they are compared with
(:mod:`~fastmask.methods.baselines`), all on one training engine (:mod:`~fastmask.methods.engine`) with one result
and run-state type (:mod:`~fastmask.methods.state`), and the registry of every method by name
(:mod:`~fastmask.methods.registry`)."""
