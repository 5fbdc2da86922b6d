"""The layers of fastmask import one way (docs/architecture.md): a module imports its own layer and the layers listed
for it below, never a layer above, so the optimizers stay usable with the ops alone and no import circle can form.
Every import counts, those inside functions too, read from the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer -> the layers it may import (besides itself). Bottom to top.
ALLOWED: dict[str, set[str]] = {
    "util": set(),
    "kernels": {"util"},
    "ops": {"util", "kernels"},
    "optim": {"util", "kernels", "ops"},
    "parallel": {"util", "kernels", "ops"},
    "fairness": {"util"},
    "data": {"util"},
    "model": {"util", "data"},
    "masking": {"util", "kernels", "ops", "parallel", "fairness", "data", "model"},
    "methods": {"util", "kernels", "ops", "optim", "parallel", "fairness", "data", "model", "masking"},
    "app": {"util", "kernels", "ops", "optim", "parallel", "fairness", "data", "model", "masking", "methods"},
}
# Modules of the package root: the version (imports nothing) and the console entry point (the app).
ROOT_MODULES = {"fastmask": "util", "fastmask.__main__": "app"}


def layer_of(module: str) -> str | None:
    """The layer of a ``fastmask`` module name, or None for a module outside fastmask."""
    parts = module.split(".")
    if parts[0] != "fastmask":
        return None
    if module in ROOT_MODULES:
        return ROOT_MODULES[module]
    if parts[1] == "_C":  # the compiled extension: the ops' C++ / CUDA backend
        return "ops"
    return parts[1]


def module_files() -> dict[str, Path]:
    """Every Python module of the installed package, by module name (kernels/ is installed as fastmask.kernels)."""
    found = {}
    for base, package in ((ROOT / "fastmask", "fastmask"), (ROOT / "kernels", "fastmask.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports_of(module: str, source: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement of ``source``, relative ones resolved."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from fastmask import ops` imports the module fastmask.ops
            out += [(node.lineno, f"{target}.{alias.name}" if target == "fastmask" else target) for alias in node.names]
    return out


def violations(modules: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import of a layer its importer may not import: ``module (layer) line N imports target (layer)``."""
    found = []
    for module, (source, is_package) in modules.items():
        layer = layer_of(module)
        for line, target in imports_of(module, source, is_package):
            target_layer = layer_of(target)
            if target_layer is None or target_layer == layer:
                continue
            if target_layer not in ALLOWED[layer]:
                found.append(f"{module} ({layer}) line {line} imports {target} ({target_layer})")
    return found


def test_every_module_belongs_to_a_layer():
    unknown = {m: layer_of(m) for m in module_files() if layer_of(m) not in ALLOWED}
    assert not unknown, unknown


def test_every_import_points_down():
    files = module_files()
    modules = {m: (p.read_text(), p.name == "__init__.py") for m, p in files.items()}
    assert violations(modules) == []


@pytest.mark.parametrize(("module", "source", "culprit"), [
    ("fastmask.ops.backend", "from fastmask.app import cli", "fastmask.app"),
    ("fastmask.optim.base", "def f():\n    from fastmask.parallel import ddp\n", "fastmask.parallel"),
    ("fastmask.data.balance", "from fastmask.fairness.metrics import auc_by_group", "fastmask.fairness.metrics"),
    ("fastmask.kernels.soft_mask", "from .. import ops", "fastmask.ops"),
    ("fastmask.util.files", "import fastmask.methods.engine", "fastmask.methods.engine"),
])
def test_an_upward_import_is_caught(module, source, culprit):
    """The check itself: each of these imports points up (or sideways to a layer not listed) and is reported."""
    is_package = module == "fastmask.kernels"
    found = violations({module: (source, is_package)})
    assert len(found) == 1 and culprit in found[0], found


def test_allowed_layers_form_no_cycle():
    seen: dict[str, int] = {}

    def depth(layer: str, path: tuple[str, ...] = ()) -> int:
        assert layer not in path, f"import cycle through {path + (layer,)}"
        if layer not in seen:
            seen[layer] = 1 + max((depth(d, path + (layer,)) for d in ALLOWED[layer]), default=0)
        return seen[layer]

    for layer in ALLOWED:
        depth(layer)
