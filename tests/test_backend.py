"""Backend choice (fastmask/backend.py): argument > FASTMASK_BACKEND > automatic; impossible requests raise with a
message that says why; the automatic choice falls back to the reference and says so once."""

from __future__ import annotations

import logging

import pytest
import torch

from fastmask import ops
from fastmask.ops import backend, reference

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)


def test_automatic_choice_on_cpu_is_the_cpp_extension():
    assert backend.resolve("fisher_accumulate_", CPU) == "cpp"
    assert backend.resolve("soft_mask", CPU) == "cpp"


def test_argument_beats_environment_beats_automatic(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert backend.resolve("soft_mask", CPU) == "reference"
    assert backend.resolve("soft_mask", CPU, "cpp") == "cpp"
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    assert backend.resolve("soft_mask", CPU) == "cpp"


def test_unknown_backend_raises_with_the_choices(monkeypatch):
    with pytest.raises(RuntimeError, match=r"backend='nope' cannot run soft_mask: unknown backend 'nope'; choose one"):
        backend.resolve("soft_mask", CPU, "nope")
    with pytest.raises(RuntimeError, match=r"unknown backend 'nope'.*'reference', 'cpp', 'cuda', 'triton'"):
        ops.soft_mask([torch.rand(3)], [torch.rand(3)], backend="nope")
    monkeypatch.setenv(backend.ENV_VAR, "fast")
    with pytest.raises(RuntimeError, match=r"FASTMASK_BACKEND='fast' cannot run fisher_accumulate_: unknown backend"):
        ops.fisher_accumulate_([torch.zeros(2)], [torch.zeros(2)], [torch.ones(2)], [torch.ones(2)])


def test_explicit_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run fisher_accumulate_: .*TRITON_INTERPRET=1"):
        ops.fisher_accumulate_([torch.zeros(2)], [torch.zeros(2)], [torch.ones(2)], [torch.ones(2)], backend="triton")
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run soft_mask: .*interpreter"):
        ops.soft_mask([torch.rand(3)], [torch.rand(3)], backend="triton")


def test_explicit_backend_for_the_wrong_device_or_op_raises():
    with pytest.raises(RuntimeError, match=r"backend 'cuda' runs on CUDA tensors, got cpu"):
        backend.resolve("percentile", CPU, "cuda")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' has no soft_mask kernel"):
        backend.resolve("soft_mask", CPU, "cuda")
    with pytest.raises(RuntimeError, match=r"backend 'cpp' runs on CPU tensors, got meta"):
        backend.resolve("soft_mask", torch.device("meta"), "cpp")


def test_automatic_choice_falls_back_once_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(backend, "_extension_error", lambda: "fastmask._C is not built (test)")
    backend._warn_fallback_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fastmask.ops.backend"):
        assert backend.resolve("soft_mask", CPU) == "reference"
        assert backend.resolve("soft_mask", CPU) == "reference"
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["fastmask: soft_mask on cpu tensors falls back to the reference backend: "
                        "fastmask._C is not built (test)"]
    with pytest.raises(RuntimeError, match=r"backend='cpp' cannot run soft_mask: fastmask._C is not built"):
        backend.resolve("soft_mask", CPU, "cpp")
    backend._warn_fallback_once.cache_clear()


def test_every_backend_name_maps_to_a_callable_with_the_reference_signature():
    assert ops.implementation("soft_mask", "reference") is reference.soft_mask
    assert ops.implementation("fisher_accumulate_", "cpp") is torch.ops.fastmask.fisher_accumulate_
    from fastmask.kernels import fisher_accumulate, soft_mask

    assert ops.implementation("fisher_accumulate_", "triton") is fisher_accumulate.fisher_accumulate_
    assert ops.implementation("soft_mask", "triton") is soft_mask.soft_mask
