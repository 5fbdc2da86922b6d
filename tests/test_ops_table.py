"""The op table (fastmask/ops/table.py) is true: every op it lists has a reference, every backend it lists has its
implementation, every file its stem names exists, every op with a schema is declared and has a fake; and nothing
outside it: every torch.ops.fastmask op, every kernels/*.py op module and every csrc op file is in it.

A composed op (``uses``) has no kernels or C++ / CUDA files of its own: it runs those of the op it uses, so its
backends must be among that op's, and the kernel files are checked under that op's stem.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch
from torch._library import simple_registry

from fastmask import _C, ops  # noqa: F401  (loading _C declares the torch.ops.fastmask ops)
from fastmask.ops import reference
from fastmask.ops.table import BACKENDS, OPS

ROOT = Path(__file__).resolve().parents[1]
CPU_FILES = "csrc/{stem}.cpp"
CUDA_FILES = ("csrc/cuda/{stem}_kernels.cu", "csrc/cuda/{stem}_cuda.cpp")
# kernels/ modules that hold what the op modules share, not an op.
SHARED_KERNEL_MODULES = ("__init__", "multi_tensor")



def checks(kind: str, items: list[str]) -> list:
    """pytest params with ids ``kind:item``."""
    return [pytest.param(item, id=f"{kind}:{item}") for item in items]


def kernel_op(name: str) -> str:
    """The op whose kernels run ``name``: itself, or the op a composed op uses."""
    return OPS[name].uses or name


def declared() -> set[str]:
    """The ops declared in the fastmask library (csrc/ops.cpp), by the dispatcher's names."""
    return {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastmask::")}


def has_kernel(name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmask::{name}", key)


def cuda_kernels_built() -> bool:
    return any(has_kernel(n, "CUDA") for n in declared())


# --- what the table lists exists -------------------------------------------------------------------------------------


def test_the_table_is_well_formed():
    for name, op in OPS.items():
        assert op.name == name and op.stem, name
        assert op.backends[0] == "reference" and set(op.backends) <= set(BACKENDS), (name, op.backends)
        assert len(set(op.backends)) == len(op.backends), name
        if op.uses is not None:
            assert not op.schema, f"{name} is composed: it has no schema of its own"
            used = OPS[op.uses]
            assert used.uses is None and set(op.backends) <= set(used.backends), (name, op.backends, used.backends)


@pytest.mark.parametrize("name", checks("reference", list(OPS)))
def test_reference_has_the_op(name):
    fn = getattr(reference, name, None)
    assert callable(fn), f"fastmask/ops/reference.py has no {name}"
    assert ops.implementation(name, "reference") is fn


@pytest.mark.parametrize("name", checks("public", list(OPS)))
def test_fastmask_ops_has_the_op(name):
    fn = getattr(ops, name, None)
    assert callable(fn) and fn.__module__ == "fastmask.ops", f"fastmask.ops has no {name}"


BACKEND_CHECKS = [f"{name}/{b}" for name, op in OPS.items() for b in op.backends if b != "reference"]


@pytest.mark.parametrize("check", checks("backend", BACKEND_CHECKS))
def test_every_listed_backend_has_its_implementation(check):
    name, backend = check.split("/")
    fn = ops.implementation(name, backend)
    assert callable(fn)
    kernels = kernel_op(name)
    if backend == "cpp":
        assert has_kernel(kernels, "CPU"), f"torch.ops.fastmask.{kernels} has no CPU kernel"
        if kernels == name:
            assert fn is getattr(torch.ops.fastmask, name)
    elif backend == "triton":
        module = importlib.import_module(f"fastmask.kernels.{OPS[kernels].stem}")
        if kernels == name:
            assert fn is getattr(module, name)
        else:
            assert callable(getattr(module, kernels))
    else:  # cuda: the files (test_named_file_exists), and the kernel wherever the extension was built with CUDA
        assert kernels in declared()
        if cuda_kernels_built():
            assert has_kernel(kernels, "CUDA"), f"torch.ops.fastmask.{kernels} has no CUDA kernel"


def named_files() -> list[str]:
    """Every file the table names: test and bench per op; the kernel files per op that has kernels of its own."""
    files: dict[str, None] = {}
    for op in OPS.values():
        files[f"tests/test_{op.stem}.py"] = None
        files[f"bench/bench_{op.stem}.py"] = None
        if op.uses is not None:
            continue
        if "triton" in op.backends:
            files[f"kernels/{op.stem}.py"] = None
        if "cpp" in op.backends:
            files[CPU_FILES.format(stem=op.stem)] = None
        if "cuda" in op.backends:
            files.update(dict.fromkeys(f.format(stem=op.stem) for f in CUDA_FILES))
    return list(files)


@pytest.mark.parametrize("path", checks("exists", named_files()))
def test_named_file_exists(path):
    assert (ROOT / path).is_file(), f"the op table names {path}, which does not exist"


@pytest.mark.parametrize("name", checks("declared", sorted(set(OPS) | declared())))
def test_declared_exactly_when_the_table_says_schema(name):
    """An op of the table with schema=True is declared in csrc/ops.cpp and has a fake (fastmask/ops/fakes.py); one
    with schema=False is not declared; no op is declared outside the table."""
    assert name in OPS, f"torch.ops.fastmask.{name} is declared but not in the op table"
    if not OPS[name].schema:
        assert name not in declared(), f"{name} has schema=False in the op table but is declared in csrc/ops.cpp"
        return
    assert name in declared(), f"{name} has schema=True in the op table but csrc/ops.cpp does not declare it"
    entry = simple_registry.singleton.find(f"fastmask::{name}")
    assert entry.fake_impl.kernel is not None, f"fastmask::{name} has no fake (fastmask/ops/fakes.py)"
    assert has_kernel(name, "CPU") == ("cpp" in OPS[name].backends), f"{name}: CPU kernel vs the table's cpp"


# --- nothing outside the table ---------------------------------------------------------------------------------------

# The ops with their own kernels, by stem and backend.
STEMS = {b: {op.stem for op in OPS.values() if op.uses is None and b in op.backends} for b in BACKENDS}


def kernel_modules() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "kernels").glob("*.py"))


@pytest.mark.parametrize("path", checks("kernel-module", kernel_modules()))
def test_kernel_module_is_an_op_of_the_table(path):
    stem = Path(path).stem
    module = importlib.import_module(f"fastmask.kernels.{stem}")
    own = [n for n in OPS if getattr(module, n, None) is not None and getattr(module, n).__module__ == module.__name__]
    if stem in SHARED_KERNEL_MODULES:
        assert not own, f"{path} is shared by the op modules but defines {own}"
        return
    assert stem in STEMS["triton"], f"{path} is not the Triton module of an op of the table (triton stems: " \
                                    f"{sorted(STEMS['triton'])})"
    listed = [n for n, op in OPS.items() if op.stem == stem and "triton" in op.backends]
    assert sorted(own) == sorted(listed), f"{path} defines {own}; the table lists triton for {listed}"


def source(path: Path) -> str:
    """C++ / CUDA source without its comments."""
    text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def csrc_op_files() -> list[str]:
    files = [*(ROOT / "csrc").glob("*.cpp"), *(ROOT / "csrc" / "cuda").glob("*.cpp"),
             *(ROOT / "csrc" / "cuda").glob("*.cu")]
    return sorted(p.relative_to(ROOT).as_posix() for p in files
                  if p.suffix == ".cu" or "TORCH_LIBRARY_IMPL(fastmask" in source(p))


@pytest.mark.parametrize("path", checks("op-file", csrc_op_files()))
def test_csrc_op_file_is_an_op_of_the_table(path):
    """A csrc/*.cpp that registers CPU kernels is csrc/<stem>.cpp, a csrc/cuda/*.cpp that registers CUDA kernels is
    csrc/cuda/<stem>_cuda.cpp, of ops of that stem listing cpp / cuda; a .cu is csrc/cuda/<stem>_kernels.cu."""
    file = Path(path)
    if file.suffix == ".cu":
        stem = file.name.removesuffix("_kernels.cu")
        assert file.name.endswith("_kernels.cu") and stem in STEMS["cuda"], \
            f"{path} is not csrc/cuda/<stem>_kernels.cu of an op listing cuda ({sorted(STEMS['cuda'])})"
        return
    backend = "cuda" if file.parent.name == "cuda" else "cpp"
    names = re.findall(r'm\.impl\(\s*"(\w+)"', source(ROOT / path))
    assert names, f"{path} registers no kernel by name"
    for name in names:
        assert name in OPS, f"{path} registers {name}, which is not in the op table"
        op = OPS[name]
        assert backend in op.backends and op.uses is None, f"{path} registers {name}, whose table entry lists " \
                                                           f"{op.backends}{' (composed)' if op.uses else ''}"
        want = CPU_FILES.format(stem=op.stem) if backend == "cpp" else CUDA_FILES[1].format(stem=op.stem)
        assert path == want, f"{path} registers {name}, whose {backend} kernel belongs in {want}"
