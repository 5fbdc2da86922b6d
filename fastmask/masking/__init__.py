"""The Fisher importances (:mod:`~fastmask.masking.importance`) and the parameter masks built from them
(:mod:`~fastmask.masking.masks`: SWiFT's soft mask, BMFT's hard mask, the ablations' random, fraction and manual
masks, and their storage). The per-tensor arithmetic runs in :mod:`fastmask.ops`."""
