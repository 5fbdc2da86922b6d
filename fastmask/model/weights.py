"""Models for the command line: an architecture or a user callable, plus a state dict read without running pickles.

A model is named in one of two ways:

- ``module:callable`` (or ``path/to/file.py:callable``): ``callable()`` must return the ``nn.Module`` (dotted
  attributes such as ``pkg.models:Nets.small`` work; the current directory is importable);
- an architecture name of torchvision (``torchvision.models.get_model(name, weights=None, num_classes=1)``) or timm
  (``timm.create_model(name, pretrained=False, num_classes=1)``): a binary head with one logit, and never a
  download. torchvision is tried first unless ``library`` says otherwise.

Weights are a state dict in a safetensors file (recognised by its header) or a ``torch.save`` file, read with
``torch.load(weights_only=True)``, which refuses to run code. A checkpoint that needs full unpickling (a saved
``nn.Module``, training arguments, numpy arrays) is refused with a message saying so, unless the caller passes
``trust_pickle=True`` (``--trust-pickle``). A checkpoint dict that wraps the state dict under ``state_dict`` /
``model_state_dict`` / ``model`` / ``net`` is unwrapped, and a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile)
prefix on every key is removed. Keys and shapes must match the model exactly; the error lists what differs.

A model may state the preprocessing it expects (:func:`input_config`): timm models carry ``pretrained_cfg`` (input
size, mean, std, crop_pct, interpolation), a torchvision architecture gets the same from its default weights'
transforms preset, and a ``module:callable`` model may expose it as ``pretrained_cfg`` or ``default_cfg``. Nothing is
downloaded.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from fastmask.util.files import atomic_write_bytes

__all__ = ["build_model", "read_state_dict", "load_weights", "load_model", "save_weights", "input_config", "Library",
           "WEIGHTS_FORMAT"]

log = logging.getLogger(__name__)

Library = Literal["auto", "torchvision", "timm"]
#: The ``format`` metadata of the weights ``fastmask debias`` writes (with their decision threshold).
WEIGHTS_FORMAT = "fastmask-weights"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "_orig_mod.")
_LIST_LIMIT = 8


def _import_module(name: str) -> Any:
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"model module file not found: {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    with _cwd_importable():
        try:
            return importlib.import_module(name)
        except ImportError as err:
            raise ImportError(f"model {name!r}: cannot import module {name!r}: {err}") from err


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """The current directory on sys.path: a console script's sys.path holds its bin/ directory, not the current
    one, and users expect `mymodels:Net` to be found where they run the command."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            sys.path.remove(cwd)


def _is_module(name: str) -> bool:
    with _cwd_importable():
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False


def _from_callable(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {spec!r}: expected 'module:callable' (e.g. 'mypkg.models:make_net')")
    obj = _import_module(module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {spec!r}: {module_name} has no attribute {attr!r} (missing {part!r})")
        obj = getattr(obj, part)
    model = obj if isinstance(obj, nn.Module) else obj() if callable(obj) else obj
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r}: {attr}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _from_architecture(name: str, library: Library) -> nn.Module:
    if library not in ("auto", "torchvision", "timm"):
        raise ValueError(f"library must be 'auto', 'torchvision' or 'timm', got {library!r}")
    problems: list[str] = []
    if library in ("auto", "torchvision"):
        try:
            import torchvision.models as tvm
        except Exception as err:  # ImportError, or RuntimeError when its compiled ops do not match this torch
            problems.append(f"torchvision cannot be imported ({type(err).__name__}: {err})")
        else:
            if name in tvm.list_models():
                model = tvm.get_model(name, weights=None, num_classes=1)
                config = _torchvision_config(tvm, name)
                if config is not None:
                    model.pretrained_cfg = config
                return model
            problems.append(f"torchvision has no architecture {name!r}")
    if library in ("auto", "timm"):
        try:
            import timm
        except Exception as err:
            problems.append(f"timm cannot be imported ({type(err).__name__}: {err})")
        else:
            if timm.is_model(name):
                return timm.create_model(name, pretrained=False, num_classes=1)
            problems.append(f"timm has no architecture {name!r}")
    raise ValueError(
        f"model {name!r} is neither 'module:callable' (e.g. 'mypkg.models:make_net') nor an architecture name "
        f"torchvision or timm can build here: {'; '.join(problems)}. Install torchvision or timm built for torch "
        f"{torch.__version__}, or name the model as 'module:callable'"
    )


def _torchvision_config(tvm: Any, name: str) -> dict[str, Any] | None:
    """The preprocessing of torchvision's default weights of ``name`` (their transforms preset: a resize, a centre
    crop, the mean and std; building it downloads nothing), in the form of timm's ``pretrained_cfg``, so that
    :func:`input_config` reads both alike; None when the architecture has no weights with such a preset."""
    try:
        weights = tvm.get_model_weights(name).DEFAULT
        preset = weights.transforms()
        crop, resize = preset.crop_size[0], preset.resize_size[0]
        mean, std = tuple(preset.mean), tuple(preset.std)
    except (AttributeError, KeyError, ValueError, TypeError, IndexError):  # no weights, or another kind of preset
        return None
    return {"input_size": (3, crop, crop), "crop_pct": crop / resize, "mean": mean, "std": std,
            "interpolation": str(getattr(preset.interpolation, "value", preset.interpolation)),
            "from": f"torchvision {weights} transforms"}


def build_model(spec: str, *, library: Library = "auto") -> nn.Module:
    """A fresh model from ``module:callable`` or a torchvision / timm architecture name (see the module docstring).

    Architectures get ``num_classes=1`` (one logit) and no pretrained weights, so nothing is downloaded.
    """
    if ":" in spec:
        return _from_callable(spec)
    # A module path without its callable (a file, or a dotted name whose first part is a module; timm's names may
    # have a dot, "resnet50.a1_in1k", but never start with a module): say what is expected rather than which
    # libraries could not find an architecture of that name.
    module, _, attr = spec.rpartition(".")
    if spec.endswith(".py") or "/" in spec or (module and _is_module(spec.partition(".")[0])):
        hint = "" if spec.endswith(".py") or "/" in spec else f"; did you mean '{module}:{attr}'?"
        raise ValueError(f"model {spec!r}: expected 'module:callable' (e.g. 'mypkg.models:make_net' or "
                         f"'path/to/file.py:make_net') or a torchvision / timm architecture name (e.g. 'resnet50')"
                         f"{hint}")
    return _from_architecture(spec, library)


def saved_threshold(path: str | os.PathLike) -> float | None:
    """The decision threshold ``fastmask debias`` saved with the weights in ``path`` (safetensors metadata), or None
    for any other file."""
    path = Path(path)
    if not path.is_file() or not _is_safetensors(path):
        return None
    meta = _metadata(path)
    if meta.get("format") != WEIGHTS_FORMAT or "threshold" not in meta:
        return None
    try:
        return float(meta["threshold"])
    except ValueError:
        raise ValueError(f"weights file {path}: its saved decision threshold {meta['threshold']!r} is not a "
                         "number") from None


def _metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file's header ({} when it has none or cannot be read)."""
    try:
        with safe_open(os.fspath(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return {}


def _is_safetensors(path: Path) -> bool:
    # A safetensors file starts with an 8-byte little-endian header length and the JSON header's "{".
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def _first_line(err: Exception) -> str:
    found = re.search(r"WeightsUnpickler error: \s*(.+)", str(err))
    return found.group(1).strip() if found else f"{type(err).__name__}: {err}".splitlines()[0]


def _is_pickle(path: Path, err: Exception) -> bool:
    """A torch.save file (a zip archive holding data.pkl, or a legacy pickle stream starting with the PROTO
    opcode) whose pickle is well formed but refers to objects that weights_only refuses."""
    if "Unsupported operand" in str(err):  # a byte that is no pickle opcode: damaged data
        return False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("data.pkl") for name in z.namelist())
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _refused_global(err: Exception) -> str:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return f" (it holds {found.group(1)}, which weights_only refuses)" if found else ""


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                log.info("%s: using the state dict under %r", path, key)
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"weights file {path} holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(
            f"weights file {path}: entries {bad[:_LIST_LIMIT]} are not tensors; expected a state dict, or a "
            f"checkpoint dict holding one under {list(_WRAPPER_KEYS)}"
        )
    state = {str(k): v for k, v in obj.items()}
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The state dict stored in ``path`` (safetensors, or torch.save read with ``weights_only=True``), on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read (the message names it and the reader's error), holds no state dict,
            or is a pickle that needs ``weights_only=False`` while ``trust_pickle`` is False.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if _is_safetensors(path):
        kind = _metadata(path).get("format", "")
        if kind.startswith("fastmask-") and kind != WEIGHTS_FORMAT:
            # A mask file holds one tensor per parameter, so a model without buffers would load it silently.
            raise ValueError(f"weights file {path} is a {kind} file written by fastmask (a mask.safetensors is a "
                             "run's mask), not a model's weights; give the run's weights.safetensors")
        try:
            return load_file(os.fspath(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"weights file {path} cannot be read as safetensors: {err}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises UnpicklingError, RuntimeError, KeyError, EOFError, ... on bad files
        # weights_only also fails on bytes that are no pickle at all; only a well-formed pickle is "pickled".
        if "Weights only load failed" not in str(err) or not _is_pickle(path, err):
            raise ValueError(f"weights file {path} cannot be read (not a safetensors or torch.save file, or "
                             f"damaged): {_first_line(err)}") from None
        if not trust_pickle:
            raise ValueError(
                f"weights file {path} is a pickled checkpoint that can only be loaded with "
                f"torch.load(weights_only=False){_refused_global(err)}, which runs code stored in the file. "
                "Pass trust_pickle=True only if you trust its source, or re-save its state_dict() "
                "with safetensors or torch.save"
            ) from None
        log.warning("%s: loading a pickled checkpoint with weights_only=False (--trust-pickle)", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    return _unwrap(obj, path)


def _listing(names: list[str]) -> str:
    more = f", ... {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return f"{names[:_LIST_LIMIT]}{more}"


def load_weights(model: nn.Module, path: str | os.PathLike, *, trust_pickle: bool = False) -> nn.Module:
    """Load the state dict in ``path`` into ``model`` (every key and shape must match; errors list the differences).

    Returns ``model``.
    """
    state = read_state_dict(path, trust_pickle=trust_pickle)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_listing(shapes)}")
        raise ValueError(f"weights file {path} does not match the model {type(model).__name__}: " + "; ".join(parts))
    _check_finite(state, {name for name, _ in model.named_parameters()}, path)
    model.load_state_dict(state, strict=True)
    return model


def _check_finite(state: Mapping[str, Tensor], params: set[str], path: str | os.PathLike) -> None:
    """Refuse NaN in any floating tensor and ±Inf in a parameter, naming the first such entry: a model with them
    predicts NaN, which every later step reports as something else (a probability out of [0, 1], a loss of NaN).
    Buffers may hold ±Inf on purpose (an attention mask filled with -inf), so only their NaN is refused."""
    for name, tensor in state.items():
        if not tensor.is_floating_point() and not tensor.is_complex():
            continue
        bad = torch.isnan(tensor) if name not in params else ~torch.isfinite(tensor)
        if bad.any():
            kinds = [k for k, m in (("NaN", torch.isnan(tensor)), ("Inf", torch.isinf(tensor))) if m.any()]
            what = "parameter" if name in params else "buffer"
            raise ValueError(f"weights file {path}: {what} {name!r} holds {' and '.join(kinds)} "
                             f"({int(bad.sum())} of {tensor.numel()} values); the model cannot predict with it")


def load_model(spec: str, weights: str | os.PathLike | None, *, trust_pickle: bool = False,
               library: Library = "auto") -> nn.Module:
    """:func:`build_model` then, when ``weights`` is given, :func:`load_weights`; the model in eval mode."""
    model = build_model(spec, library=library)
    if weights is not None:
        load_weights(model, weights, trust_pickle=trust_pickle)
    return model.eval()


def save_weights(model: nn.Module | Mapping[str, Tensor], path: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write a model's state dict (parameters and buffers) as safetensors, atomically.

    Tensors are copied to the CPU one by one, so tensors that share storage (tied weights) are stored separately.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=dict(metadata or {})))


#: The attributes a model's own preprocessing configuration is read from, in this order (timm's, then its older
#: name).
CONFIG_ATTRIBUTES = ("pretrained_cfg", "default_cfg")


def input_config(model: nn.Module) -> dict[str, Any] | None:
    """The preprocessing ``model``'s own configuration states, or None when it states none.

    Read from the first of :data:`CONFIG_ATTRIBUTES` that is a mapping holding ``input_size``, ``mean`` or ``std``;
    returns those of ``input_size`` (C, H, W), ``size`` (its height and width when square), ``mean``, ``std``,
    ``crop_pct``, ``interpolation`` and ``from`` (what stated them, for a torchvision architecture) that it holds,
    and ``attribute``, where they were found. A value of the
    wrong form is an error naming the attribute and the key: a configuration that is there but unreadable would
    otherwise be ignored in silence.
    """
    for attr in CONFIG_ATTRIBUTES:
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping) and any(k in cfg for k in ("input_size", "mean", "std")):
            break
    else:
        return None
    where = f"the model's {attr}"
    out: dict[str, Any] = {"attribute": attr}
    if cfg.get("input_size") is not None:
        size = cfg["input_size"]
        if not (isinstance(size, (tuple, list)) and len(size) == 3 and all(isinstance(v, int) and v > 0
                                                                            for v in size)):
            raise ValueError(f"{where}['input_size'] is {size!r}, not (channels, height, width)")
        out["input_size"] = tuple(size)
        if size[1] == size[2]:  # fastmask resizes to a square: another shape gives no size to take
            out["size"] = size[1]
    for key in ("mean", "std"):
        if cfg.get(key) is not None:
            value = cfg[key]
            if not (isinstance(value, (tuple, list)) and len(value) == 3
                    and all(isinstance(v, (int, float)) for v in value)):
                raise ValueError(f"{where}['{key}'] is {value!r}, not 3 numbers (R, G, B)")
            out[key] = tuple(float(v) for v in value)
    if cfg.get("crop_pct") is not None:
        pct = cfg["crop_pct"]
        if not (isinstance(pct, (int, float)) and 0 < pct <= 1):
            raise ValueError(f"{where}['crop_pct'] is {pct!r}, not a fraction in (0, 1]")
        out["crop_pct"] = float(pct)
    for key in ("interpolation", "from"):
        if cfg.get(key) is not None:
            out[key] = str(cfg[key])
    return out
