"""The baselines SWiFT and BMFT are compared against ([PS] §4.3, [PB] §3.3; docs/algorithm.md §9), on the same
engine, one module per family: :mod:`~.finetune` (Baseline, FullFT-RW / -Reg / -FDR, LLFT), :mod:`~.bias_proxy`
(DiffGda, DiffPrune), :mod:`~.fairprune` and :mod:`~.ablations` (random, hard and manual masks on the SWiFT / BMFT
pipelines).

Every method has the call shape of :func:`fastmask.methods.swift.swift` / :func:`fastmask.methods.bmft.bmft`::

    method(model, mask_loader, train_loader, *, config=None, progress=False) -> Result

``model`` is modified in place; ``mask_loader`` is the **unbalanced** external set D_e (batches (x, y, a, ...)) and
``train_loader`` the **group-balanced** D_r (:func:`fastmask.data.balance.group_balance`). Which of the two a method
reads, which parameters it changes and which loss it minimises is what defines it; each docstring says so.

==============  ======================================  =======================  ==================================
method          parameters changed                      data                     loss / criterion
==============  ======================================  =======================  ==================================
Baseline        none                                    none                     --
FullFT-RW       all                                     D_r                      WBCE
FullFT-Reg      all                                     D_e                      β·WBCE + (1 − β)·B   ([PS] Eq. 10)
FullFT-FDR      all                                     D_r                      β·WBCE + (1 − β)·B   (Le et al.)
LLFT            head (re-initialised)                   D_r                      WBCE + β·B           (Mao et al.)
DiffGda         all                                     D_e                      ±(signed proxy), best checkpoint
DiffPrune       BN (or conv) channels set to 0          D_e                      activation × ∂proxy, best step
FairPrune       weights set to 0                        D_e, per group           ½θ²F per group (Wu et al.)
Random mask     SWiFT pipeline, M ~ U[0, 1)             D_e, D_r                 as SWiFT
Hard mask       SWiFT pipeline, M = 1[R > q]            D_e, D_r                 as SWiFT
Manual masks    BMFT pipeline, M = 1 on BN / 1st convs  D_e, D_r                 as BMFT
==============  ======================================  =======================  ==================================

:data:`fastmask.methods.registry.METHODS` names every method, SWiFT and BMFT included.

References: Le et al. 2023 (FDR: "Fairness via data balancing and regularisation"), Mao et al. 2023 ("Last-layer
fairness fine-tuning is simple and effective for neural networks"), Marcinkevics et al. 2022 ("Debiasing deep chest
X-ray classifiers using intra- and post-processing methods", MLHC; DiffGda, DiffPrune), Wu et al. 2022 ("FairPrune:
achieving fairness through pruning for dermatological disease diagnosis", MICCAI).
"""
