"""Splitting a binary classifier f = C∘E into its head C and its feature extractor E (docs/algorithm.md §5 notation,
§8.20).

SWiFT and BMFT treat the two parts differently: the mask scales E's updates in step 1, the head is (partly)
re-initialised and retrained in step 2, and BMFT's global percentile runs over E only. The authors' code separates
them by matching ``"head"`` in parameter names; fastmask uses **module membership** instead, so a backbone layer that
happens to be called ``head`` (timm's ``head.norm``, say) is never mistaken for the classifier, and no naming
convention is imposed on the user's model.

The contract: the head is one module whose output is the single binary **logit** z (out_features == 1), p = σ(z).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["split_head", "find_head_name"]


def find_head_name(model: nn.Module) -> str:
    """Dotted module path of the last ``nn.Linear`` in module order (torchvision ``fc`` / ``classifier.1`` /
    ``heads.head``, timm ``head`` / ``head.fc`` / ``fc``)."""
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name = module_name
    if name is None:
        raise ValueError(
            f"no nn.Linear layer found in {type(model).__name__}; pass head='<module path>' naming the classifier "
            "module that outputs the binary logit"
        )
    return name


def _linears(module: nn.Module) -> Iterable[tuple[str, nn.Linear]]:
    return ((n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear))


def split_head(
    model: nn.Module, head: str | None = None
) -> tuple[nn.Module, dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """Split ``model`` into (head module, head parameters, feature-extractor parameters).

    Args:
        model: the classifier f = C∘E; it must output one logit per sample.
        head: dotted module path of C (e.g. ``"fc"``, ``"classifier"``, ``"head"``); ``None`` picks the last
            ``nn.Linear`` in module order.

    Returns:
        ``(head_module, head_params, feature_params)``; both dicts map the names of ``model.named_parameters()``
        to the parameters, in model order. A parameter belongs to the head iff it is registered in the head module's
        subtree (shared parameters are seen once, as ``named_parameters`` sees them); every other parameter,
        BatchNorm affine parameters included, forms E.

    Raises:
        ValueError: no Linear layer, ``head`` is not a module path of ``model``, the head holds no parameters, or
            its last Linear does not have out_features == 1 (fastmask's binary-logit contract).
    """
    if head is None:
        head = find_head_name(model)
    try:
        head_module = model.get_submodule(head)
    except AttributeError as exc:
        modules = [n for n, _ in model.named_children()]
        raise ValueError(
            f"head={head!r} is not a module of {type(model).__name__} (its top-level modules: {modules})"
        ) from exc
    if head_module is model:
        raise ValueError("head must name a submodule, not the whole model (head='')")

    linears = list(_linears(head_module))
    if linears:
        lin_name, last = linears[-1]
        if last.out_features != 1:
            where = f"{head}.{lin_name}" if lin_name else head
            raise ValueError(
                f"head {where!r} has out_features={last.out_features}; fastmask needs a binary classifier whose head "
                "outputs one logit z per sample (p = sigmoid(z)). Replace it with nn.Linear(in_features, 1)."
            )

    head_ids = {id(p) for p in head_module.parameters()}
    if not head_ids:
        raise ValueError(f"head module {head!r} ({type(head_module).__name__}) has no parameters")
    head_params: dict[str, nn.Parameter] = {}
    feature_params: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        (head_params if id(p) in head_ids else feature_params)[name] = p
    return head_module, head_params, feature_params
