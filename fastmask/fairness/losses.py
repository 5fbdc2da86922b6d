"""Training objectives of SWiFT and BMFT: the weighted BCE and the differentiable bias functions (docs/algorithm.md
§2, §8.1-8.2).

Notation (docs/algorithm.md §2): z are logits, y ∈ {0,1} labels, a ∈ {0,1} the sensitive attribute; for a vector v
over the batch, m_{g,c}(v) is the mean of v over the samples with a = g and y = c, and m_g(v) the mean over a = g.

Presets (SWIFT_BIAS is docs/algorithm.md §8.1's default):
    SWIFT_BIAS      = BiasSpec("log", "eodds_abs")   SWiFT [PS] Eqs. 2-4 on log-probabilities.
    BMFT_BIAS       = BiasSpec("logit", "eodds_sum") BMFT code: `compute_empirical_bias(z, y, a, 'eodds')` (faithful).
    BMFT_PAPER_BIAS = BiasSpec("prob", "eopp")       BMFT [PB] Eq. 2, |m_{0,1}(p) − m_{1,1}(p)|.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

__all__ = [
    "Space",
    "Form",
    "Empty",
    "BiasSpec",
    "SWIFT_BIAS",
    "BMFT_BIAS",
    "BMFT_PAPER_BIAS",
    "wbce",
    "bias_loss",
    "combined_loss",
]

Space = Literal["log", "prob", "logit"]
Form = Literal["eodds_abs", "eodds_sum", "eodds_avgodds", "eopp", "spd"]
Empty = Literal["zero", "skip"]

_SPACES: tuple[str, ...] = get_args(Space)
_FORMS: tuple[str, ...] = get_args(Form)
_EMPTIES: tuple[str, ...] = get_args(Empty)


def _batch_vector(t: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``t`` as a 1-D batch vector; accepts shape (B,) or (B, 1) (a one-logit head's output)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 2 and t.shape[1] == 1:
        return t[:, 0]
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape (B,) or (B, 1), got {tuple(t.shape)}")
    return t


def _binary_vector(t: torch.Tensor, name: str, batch: int) -> torch.Tensor:
    """Check that ``t`` is a length-``batch`` vector of 0/1 values and return it flattened."""
    t = _batch_vector(t, name)
    if t.shape[0] != batch:
        raise ValueError(f"{name} has {t.shape[0]} entries but the logits have {batch}")
    if t.dtype == torch.bool:
        return t
    ok = (t == 0) | (t == 1)
    if not bool(ok.all()):
        bad = t[~ok][:5].tolist()
        raise ValueError(f"{name} must contain only 0 and 1, found e.g. {bad}")
    return t


def wbce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-batch weighted binary cross-entropy, exactly as the authors' code computes it (docs/algorithm.md §2).

    With n_p = Σy + 1e-10 and n_n = Σ(1 − y) over the batch, pos_weight w = n_n / n_p and scale s = n_p / (n_p + n_n):

        L_WBCE = s · (1/B) Σ_i −[ w·y_i·log σ(z_i) + (1 − y_i)·log(1 − σ(z_i)) ]

    i.e. ``BCEWithLogitsLoss(pos_weight=w)`` with mean reduction, times s. Algebraically this is
    (1/B) Σ_i −[ (n_n/B)·y_i·log p_i + (n_p/B)·(1 − y_i)·log(1 − p_i) ], the SWiFT/BMFT paper Eq. 1 divided by B
    with per-batch counts. A batch holding a single class gives a loss of ≈0 (not NaN).

    Args:
        logits: shape (B,) or (B, 1), the head's logits z.
        y: shape (B,) or (B, 1), labels in {0, 1} (any dtype).

    Returns:
        A 0-d tensor in the logits' dtype, attached to the logits' graph.
    """
    z = _batch_vector(logits, "logits")
    if z.shape[0] == 0:
        raise ValueError("wbce: the batch is empty (logits has 0 entries)")
    if not z.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {z.dtype}")
    target = _binary_vector(y, "y", z.shape[0]).to(dtype=z.dtype, device=z.device)
    n_p = target.sum() + 1e-10
    n_n = (1 - target).sum()
    pos_weight = n_n / n_p
    scale = n_p / (n_p + n_n)
    return F.binary_cross_entropy_with_logits(z, target, pos_weight=pos_weight, reduction="mean") * scale


@dataclass(frozen=True)
class BiasSpec:
    """Choice of bias function: the space of v, the form of the gap, and the empty-cell rule (docs/algorithm.md §2,
    §8.1-8.2).

    Args:
        space: what v is: ``"logit"`` (v = z), ``"prob"`` (v = σ(z)) or ``"log"`` (v = log σ(z) via logsigmoid).
        form: ``"eodds_abs"``, ``"eodds_sum"``, ``"eodds_avgodds"``, ``"eopp"`` or ``"spd"`` (see :func:`bias_loss`).
        empty: ``"zero"`` (faithful zero-fill of an empty cell's mean) or ``"skip"`` (drop a gap with an empty cell).
    """

    space: Space = "log"
    form: Form = "eodds_abs"
    empty: Empty = "zero"

    def __post_init__(self) -> None:
        _check_choice("space", self.space, _SPACES)
        _check_choice("form", self.form, _FORMS)
        _check_choice("empty", self.empty, _EMPTIES)

    def __call__(self, z: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Evaluate :func:`bias_loss` with this spec."""
        return bias_loss(z, y, a, space=self.space, form=self.form, empty=self.empty)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


SWIFT_BIAS = BiasSpec(space="log", form="eodds_abs", empty="zero")
BMFT_BIAS = BiasSpec(space="logit", form="eodds_sum", empty="zero")
BMFT_PAPER_BIAS = BiasSpec(space="prob", form="eopp", empty="zero")


def bias_loss(
    z: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    *,
    space: Space = "log",
    form: Form = "eodds_abs",
    empty: Empty = "zero",
) -> torch.Tensor:
    """Differentiable group-fairness gap of a batch (docs/algorithm.md §2; defaults = SWiFT [PS] Eqs. 2-4,
    docs/algorithm.md §8.1).

    v is z (``space="logit"``), σ(z) (``"prob"``) or log σ(z) (``"log"``, computed with logsigmoid so that
    |z| = 100 stays finite). With m_{g,c} = m_{g,c}(v) and m_g = m_g(v):

    - ``"eodds_abs"`` ([PS] Eqs. 2-4): |m_{0,1} − m_{1,1}| + |m_{0,0} − m_{1,0}|  (no ½);
    - ``"eodds_sum"`` (the authors' code ``eodds``): ½·|(m_{0,0} − m_{1,0}) + (m_{0,1} − m_{1,1})| (signed sum);
    - ``"eodds_avgodds"``: ½·(|m_{0,1} − m_{1,1}| + |m_{0,0} − m_{1,0}|);
    - ``"eopp"`` ([PB] Eq. 2 with ``space="prob"``): |m_{0,1} − m_{1,1}|;
    - ``"spd"``: |m_0 − m_1|.

    Empty cells (docs/algorithm.md §8.2): ``empty="zero"`` replaces an empty cell's mean by the constant 0, as the
    authors' code does (the gap is then compared against 0, and the constant carries no gradient); ``empty="skip"``
    drops every gap term that has an empty cell on either side. The result is always a tensor attached to z's graph,
    so ``backward()`` works even when every term is constant (its gradient is then 0), and it is never NaN.

    Args:
        z: logits, shape (B,) or (B, 1), floating point.
        y: labels in {0, 1}, shape (B,) or (B, 1).
        a: binary sensitive attribute in {0, 1}, shape (B,) or (B, 1).

    Returns:
        A 0-d tensor (float32 for half-precision logits, else the logits' dtype).
    """
    _check_choice("space", space, _SPACES)
    _check_choice("form", form, _FORMS)
    _check_choice("empty", empty, _EMPTIES)
    z = _batch_vector(z, "z")
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor, got {z.dtype}")
    batch = z.shape[0]
    yv = _binary_vector(y, "y", batch).to(device=z.device, dtype=torch.long)
    av = _binary_vector(a, "a", batch).to(device=z.device, dtype=torch.long)

    # Half-precision sums over a batch lose too much; the loss is a scalar, so computing it in fp32 costs nothing.
    zc = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    if space == "logit":
        v = zc
    elif space == "prob":
        v = torch.sigmoid(zc)
    else:
        v = F.logsigmoid(zc)

    # Cell index 2a + y: 0 = (a0,y0), 1 = (a0,y1), 2 = (a1,y0), 3 = (a1,y1). One scatter-add gives all four sums.
    cell = 2 * av + yv
    sums = torch.zeros(4, dtype=v.dtype, device=v.device).index_add(0, cell, v)
    counts = torch.bincount(cell, minlength=4).to(v.dtype)
    # An empty cell has sum 0 over count clamped to 1, i.e. exactly the zero-fill constant, with zero gradient and no
    # 0/0 anywhere in the graph (a NaN in an unselected torch.where branch would still poison the gradient).
    means = sums / counts.clamp_min(1)
    present = counts > 0

    def gap(i: int, j: int) -> torch.Tensor:
        d = means[i] - means[j]
        if empty == "skip":
            d = torch.where(present[i] & present[j], d, torch.zeros_like(d))
        return d

    if form == "spd":
        g_sums = sums.view(2, 2).sum(1)
        g_counts = counts.view(2, 2).sum(1)
        g_means = g_sums / g_counts.clamp_min(1)
        d = g_means[0] - g_means[1]
        if empty == "skip":
            d = torch.where((g_counts > 0).all(), d, torch.zeros_like(d))
        out = d.abs()
    else:
        tpr_gap = gap(1, 3)  # m_{0,1} − m_{1,1}
        if form == "eopp":
            out = tpr_gap.abs()
        else:
            fpr_gap = gap(0, 2)  # m_{0,0} − m_{1,0}
            if form == "eodds_sum":
                out = 0.5 * (fpr_gap + tpr_gap).abs()
            elif form == "eodds_abs":
                out = tpr_gap.abs() + fpr_gap.abs()
            else:
                out = 0.5 * (tpr_gap.abs() + fpr_gap.abs())
    return out


def combined_loss(
    z: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    *,
    wbce_weight: float,
    bias_weight: float,
    bias: BiasSpec = SWIFT_BIAS,
) -> torch.Tensor:
    """Weighted objective ``wbce_weight · WBCE(z, y) + bias_weight · B(z, y, a)`` (docs/algorithm.md §5).

    The steps of docs/algorithm.md §5 as (wbce_weight, bias_weight): SWiFT step 1 (β, 1 − β) ([PS] Eq. 10), SWiFT step 2
    (1 − β, β), BMFT impair (0, 1) and BMFT repair (1, β) ([PB] Eq. 5). A term whose weight is 0 is not computed.

    Args:
        z: logits, shape (B,) or (B, 1).
        y: labels in {0, 1}.
        a: binary sensitive attribute in {0, 1}.
        wbce_weight: weight of :func:`wbce`.
        bias_weight: weight of the bias function.
        bias: the bias function (:class:`BiasSpec`).
    """
    if wbce_weight == 0 and bias_weight == 0:
        raise ValueError("combined_loss: wbce_weight and bias_weight are both 0")
    terms = []
    if wbce_weight != 0:
        terms.append(wbce_weight * wbce(z, y))
    if bias_weight != 0:
        terms.append(bias_weight * bias(z, y, a))
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]
