"""torch.compile of steps with the masked optimizers, against torch.optim compiled the same way (the oracle).

- Graphs: a training step (forward, backward and ``opt.step()`` in one compiled function) and ``torch.compile(
  opt.step)`` split into as many graphs, with as many graph breaks, as with torch.optim.Adam / AdamW / SGD, counted
  by a counting backend and Dynamo's graph-break counter. ``fullgraph=True`` fails where it fails for torch's
  optimizer (its step's own graph breaks) and works for the functional ops as for torch's functional ``adam`` /
  ``sgd``.
- Results: parameters and every state buffer after several compiled steps (AOT autograd: the ops' fakes and
  functionalisation) equal, bit for bit, the same steps taken eagerly, with and without masks, on every backend.
- The Triton launcher's opaque op ``fastmask_triton::<op>`` passes ``torch.library.opcheck``.
- The launch tables a Triton step reads are built once per group and rebuilt exactly when a tensor's storage or a
  mask changes (so a steady-state step copies no table to the device and can be captured in a CUDA graph).
- capturable with a scheduler's tensor lr: the Python implementations take the lr as a device tensor and step
  exactly as with the same float.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from conftest import op_backends
from torch._dynamo.testing import CompileCounter
from torch.optim.adam import adam as torch_adam

from fastmask import ops
from fastmask.optim import MaskedAdam, MaskedAdamW, MaskedSGD

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = op_backends("masked_adam_")
PAIRS = {
    "adam": (MaskedAdam, torch.optim.Adam, dict(lr=1e-2)),
    "adamw-amsgrad": (MaskedAdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    "sgd-momentum": (MaskedSGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
}
X, Y = torch.randn(16, 6, generator=torch.Generator().manual_seed(0)), torch.randn(16, 1)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer):
    def step() -> torch.Tensor:
        loss = ((net(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
        return loss

    return step


def run(net, opt, pattern: str, steps: int, compile_backend) -> None:
    """``steps`` steps of ``pattern``: "train" compiles forward, backward and step together; "step" compiles
    ``opt.step`` alone (gradients from an eager backward); "eager" compiles nothing."""
    if pattern == "step":
        stepped = opt.step if compile_backend is None else torch.compile(opt.step, backend=compile_backend)
        fn = lambda: (((net(X) - Y) ** 2).mean().backward(), stepped())  # noqa: E731
    else:
        fn = train_step(net, opt)
        if compile_backend is not None:
            fn = torch.compile(fn, backend=compile_backend)
    for _ in range(steps):
        opt.zero_grad()
        fn()


def graphs(cls, kw, pattern: str) -> tuple[int, int]:
    """(graphs compiled, graph breaks) over three steps of ``pattern`` with optimizer ``cls(**kw)``."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounter()
    net = model()
    run(net, cls(net.parameters(), **kw), pattern, 3, counter)
    return counter.frame_count, sum(torch._dynamo.utils.counters["graph_break"].values())


@pytest.mark.parametrize("pattern", ["train", "step"])
@pytest.mark.parametrize("config", list(PAIRS))
def test_graphs_and_breaks_equal_torchs(config, pattern):
    ours, theirs, kw = PAIRS[config]
    expected = graphs(theirs, kw, pattern)
    assert graphs(ours, kw, pattern) == expected
    assert expected[0] >= 1  # torch's step is compiled (not skipped), so equal counts say ours is too


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpp"])  # cpp: the automatic choice, above
def test_graphs_equal_torchs_on_every_backend(backend):
    ours, theirs, kw = PAIRS["adam"]
    assert graphs(ours, dict(kw, backend=backend), "train") == graphs(theirs, kw, "train")


# Every optimizer with and without masks on the automatic CPU backend; the others with masks.
EQUAL_CASES = [("cpp", config, masked) for config in PAIRS for masked in (False, True)] + [
    (backend, config, True) for backend in BACKENDS if backend != "cpp" for config in ("adam", "sgd-momentum")
]


@pytest.mark.parametrize("backend, config, masked", EQUAL_CASES)
def test_compiled_steps_equal_eager_steps(backend, config, masked):
    """Four compiled training steps (AOT autograd over the ops' fakes) and four eager ones: every parameter and
    state tensor bit for bit; masks: a bool mask and float masks, in "update" mode."""
    cls, _, kw = PAIRS[config]
    results = []
    for compile_backend in (None, "aot_eager"):
        torch._dynamo.reset()
        net = model()
        g = torch.Generator().manual_seed(1)
        masks = None
        if masked:
            masks = {n: torch.rand(p.shape, generator=g) for n, p in net.named_parameters()}
            masks["0.weight"] = masks["0.weight"] > 0.5
        opt = cls(net.named_parameters(), **kw, masks=masks, mask_mode="update" if masked else "grad",
                  backend=backend)
        run(net, opt, "train", 4, compile_backend)
        results.append(([p.detach().clone() for p in net.parameters()], copy.deepcopy(opt.state_dict()["state"])))
    (eager_params, eager_state), (compiled_params, compiled_state) = results
    for a, b in zip(eager_params, compiled_params, strict=True):
        assert torch.equal(a, b)
    assert eager_state.keys() == compiled_state.keys()
    for i, state in eager_state.items():
        assert state.keys() == compiled_state[i].keys()
        for key, value in state.items():
            assert torch.equal(value, compiled_state[i][key]), (i, key)


@pytest.mark.parametrize("config", list(PAIRS))
def test_fullgraph_step_fails_where_torchs_fails(config):
    """torch.optim's step graph-breaks on purpose (its grad-mode decorator), so ``fullgraph=True`` cannot compile
    it; ours has the same breaks and fails the same way."""
    ours, theirs, kw = PAIRS[config]
    errors = []
    for cls in (theirs, ours):
        torch._dynamo.reset()
        net = model()
        opt = cls(net.parameters(), **kw)
        ((net(X) - Y) ** 2).mean().backward()
        with pytest.raises(torch._dynamo.exc.Unsupported) as info:
            torch.compile(opt.step, backend="eager", fullgraph=True)()
        errors.append(str(info.value).splitlines()[0])
    assert errors[0] == errors[1]


def adam_functional(fn, params, grads, state, **extra):
    exp_avgs, exp_avg_sqs, steps = state
    fn(params, grads, exp_avgs, exp_avg_sqs, [], steps, **extra, lr=1e-2, beta1=0.9, beta2=0.999,
       weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_functional_step_compiles_to_one_graph_as_torchs(backend):
    """``fullgraph=True`` over the functional step works for torch.optim.adam.adam and for ops.masked_adam_: one
    graph each, and the compiled masked step equals the eager one."""
    g = torch.Generator().manual_seed(2)
    shapes = [(5, 3), (7,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    masks = [torch.rand(s, generator=g) > 0.3 for s in shapes]

    def fresh():
        return ([p.clone() for p in params], ([torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes],
                                              [torch.tensor(0.0) for _ in shapes]))

    counts = []
    for step in (
        lambda ps, st: adam_functional(torch_adam, ps, grads, st, foreach=False, capturable=False),
        lambda ps, st: adam_functional(ops.masked_adam_, ps, grads, st, masks=masks, mask_mode="update",
                                       backend=backend),
    ):
        torch._dynamo.reset()
        counter = CompileCounter()
        ps, st = fresh()
        compiled = torch.compile(step, backend=counter, fullgraph=True)
        for _ in range(2):
            compiled(ps, st)
        counts.append(counter.frame_count)
    assert counts == [1, 1]
    eager_ps, eager_st = fresh()
    for _ in range(2):
        adam_functional(ops.masked_adam_, eager_ps, grads, eager_st, masks=masks, mask_mode="update",
                        backend=backend)
    for a, b in zip([*eager_ps, *eager_st[0], *eager_st[1]], [*ps, *st[0], *st[1]], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("config", ["adam", "sgd-momentum"])
def test_eager_steps_after_compiled_ones_equal_torchs(config):
    """Compiled steps, then eager ones, on one optimizer (Dynamo marks capturable in its traced copy of the groups):
    the eager steps still work and the whole run equals torch.optim's."""
    ours, theirs, kw = PAIRS[config]
    nets = []
    opts = []
    for cls in (ours, theirs):
        torch._dynamo.reset()
        net = model()
        opt = cls(net.parameters(), **kw)
        run(net, opt, "train", 2, "eager")
        run(net, opt, "train", 2, None)
        nets.append(net)
        opts.append(opt)
    assert opts[0].param_groups[0].get("capturable") == opts[1].param_groups[0].get("capturable")
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton")
@pytest.mark.parametrize("op", ["masked_adam_", "masked_sgd_"])
def test_triton_launcher_op_passes_opcheck(op):
    """The opaque op that carries a Triton step through torch.compile: schema (mutated arguments), fake and AOT
    dispatch checked against the launcher itself."""
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 4), (5,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    masks = [torch.rand(shapes[0], generator=g), None]
    if op == "masked_adam_":
        args = (params, grads, [torch.randn(s, generator=g) for s in shapes],
                [torch.rand(s, generator=g) for s in shapes], [], [torch.tensor(3.0) for _ in shapes], masks)
        kwargs = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                      decoupled_weight_decay=False, mask_update=False)
    else:
        args = (params, grads, [torch.randn(s, generator=g) for s in shapes], masks)
        kwargs = dict(lr=1e-2, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False,
                      first_step=False, mask_update=True)
    torch.library.opcheck(getattr(torch.ops.fastmask_triton, op).default, args, kwargs)


@pytest.mark.parametrize("op", ["masked_adam_", "masked_sgd_"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpp"])
def test_a_tensor_lr_steps_as_the_same_float(backend, op):
    """ops passes a device tensor lr (capturable) to the reference and Triton implementations as a float64 tensor,
    used without reading it on the host: the step equals the one with the float, bit for bit (device-resident
    steps, AdamW decay, Nesterov momentum)."""
    g = torch.Generator().manual_seed(4)
    shapes = [(3, 4), (33,)]
    lr = 0.0123
    masks = [torch.rand(shapes[0], generator=g), None]
    start = [[torch.rand(s, generator=g) for s in shapes] for _ in range(4)]
    results = []
    for lr_arg in (lr, torch.tensor(lr, dtype=torch.float64)):
        params, grads, first, second = ([t.clone() for t in ts] for ts in start)
        fn = ops.implementation(op, backend)
        if op == "masked_adam_":
            fn(params, grads, first, second, [], [torch.tensor(3.0) for _ in shapes], masks, lr=lr_arg, beta1=0.9,
               beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False, decoupled_weight_decay=True,
               mask_update=False)
        else:
            fn(params, grads, first, masks, lr=lr_arg, weight_decay=0.1, momentum=0.9, dampening=0.0, nesterov=True,
               maximize=False, first_step=False, mask_update=False)
        results.append([*params, *first, *second])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton")
def test_launch_tables_are_rebuilt_only_when_storage_or_masks_change(monkeypatch):
    """Steady-state steps (gradients kept in place, as ``zero_grad(set_to_none=False)`` keeps them) reuse the
    group's tables: no build, so no copy to the device; new masks, a parameter's new storage (``p.data = ...``) or
    new state buffers (a loaded state dict) rebuild them, and every step stays equal to the reference backend's."""
    from fastmask.kernels import multi_tensor as mt

    builds = []
    build = mt.address_table
    monkeypatch.setattr(mt, "address_table", lambda *args: builds.append(1) or build(*args))
    mt.clear_tables()
    g = torch.Generator().manual_seed(5)
    shapes = [(3, 4), (33,), (1,)]
    start = [torch.randn(s, generator=g) for s in shapes]
    masks = [torch.rand(s, generator=g) for s in shapes]
    opts = {b: MaskedAdamW([p.clone().requires_grad_() for p in start], lr=1e-2, masks=masks, backend=b)
            for b in ("triton", "reference")}
    expected_builds = []
    for t in range(7):
        if t == 3:
            for opt in opts.values():
                opt.set_masks([m > 0.5 for m in masks])
        if t == 4:
            for opt in opts.values():
                p = opt.param_groups[0]["params"][1]
                p.data = p.data.clone()
        if t == 5:
            for opt in opts.values():
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        for opt in opts.values():
            for p in opt.param_groups[0]["params"]:
                grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(t))
                p.grad = grad if p.grad is None else p.grad.copy_(grad)
            opt.step()
        expected_builds.append(1 if t in (0, 3, 4, 5) else 0)
        assert len(builds) == sum(expected_builds), t
        for a, b in zip(opts["triton"].param_groups[0]["params"], opts["reference"].param_groups[0]["params"],
                        strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
