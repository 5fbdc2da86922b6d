// CPU kernel of fastmask::masked_sgd_ (schema in csrc/ops.cpp; semantics and oracle in fastmask/reference.py): one
// pass over memory per element, reading p, g, buf and the mask and writing p, buf once. What it shares with
// masked_adam_ (storage types, mask kinds, the parallel runner, ISA dispatch, argument checks) and the rules both
// follow are in csrc/masked_optim.h.
//
// Opmath arithmetic, operation by operation as torch.optim.SGD's single-tensor step:
//   d = g + λθ;  b ← b·μ + (1−τ)·d (d on the first step);  d ← d + μ·b (nesterov) or b;  θ ← θ − lr·d.

// First include: masked_optim.h turns off FP contraction (multiply-adds are fused only where written as std::fma)
// with a #pragma that must precede every other header.
#include "masked_optim.h"

#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

namespace fastmask {
namespace masked_optim {
namespace {

enum class Momentum { kNone, kFirst, kRunning };

template <typename T, typename Mask, Momentum kMomentum, bool kScaled>
FASTMASK_VECTOR_CLONES void sgd_segment(const Item& it, int64_t lo, int64_t hi, const Hyper& h) {
  using S = Storage<T>;
  using raw = typename S::raw;
  using acc = typename S::acc;
  raw* __restrict__ p = static_cast<raw*>(it.param);
  const raw* __restrict__ g = static_cast<const raw*>(it.grad);
  raw* __restrict__ buf = static_cast<raw*>(it.state0);
  const typename Mask::storage* __restrict__ mk = static_cast<const typename Mask::storage*>(it.mask);
  const acc scale = static_cast<acc>(h.grad_scale), wd = static_cast<acc>(h.weight_decay);
  const acc lr = static_cast<acc>(h.lr), neg_lr = -static_cast<acc>(h.lr);
  const acc momentum = static_cast<acc>(h.momentum), one_minus_dampening = static_cast<acc>(h.one_minus_dampening);
  const bits_t<acc> maximize = mask_of_bool<acc>(h.maximize), l2 = mask_of_bool<acc>(h.l2), nesterov = mask_of_bool<acc>(h.nesterov);
  const bool update_mode = Mask::present && h.mask_update;
  const bits_t<acc> update = mask_of_bool<acc>(update_mode);
  const float keep_at = update_mode ? 0.0f : std::numeric_limits<float>::quiet_NaN();
  const raw zero = S::store(acc(0));
#pragma GCC ivdep
  for (int64_t j = lo; j < hi; ++j) {
    const raw p_raw = p[j];
    const acc theta = S::load(p_raw);
    acc d = S::load(g[j]);
    if constexpr (kScaled) d = d / scale;
    d = negate_if(maximize, d);
    float mval = 1.0f;
    if constexpr (Mask::present) {
      mval = Mask::value(mk[j]);
      d = choose<acc>(update, d, d * static_cast<acc>(mval));
    }
    const bool keep = Mask::present & (mval == keep_at);
    d = choose<acc>(l2, std::fma(theta, wd, d), d);  // grad.add(param, alpha=λ)
    if constexpr (kMomentum != Momentum::kNone) {
      acc b;
      if constexpr (kMomentum == Momentum::kFirst) {
        b = d;  // torch.clone(grad); masked-out buffers of an update-mode first step start at 0 (the reference's)
        buf[j] = choose<raw>(keep, zero, S::store(b));
      } else {
        const raw b_raw = buf[j];
        b = std::fma(d, one_minus_dampening, S::load(b_raw) * momentum);  // buf.mul_(μ).add_(d, alpha=1 − τ)
        buf[j] = choose<raw>(keep, b_raw, S::store(b));
      }
      d = choose<acc>(nesterov, std::fma(b, momentum, d), b);  // grad.add(buf, alpha=μ)
    }
    const acc p_new = choose<acc>(update, theta - lr * (static_cast<acc>(mval) * d), std::fma(d, neg_lr, theta));
    p[j] = choose<raw>(keep, p_raw, S::store(p_new));
  }
}

SegmentFn sgd_fn(at::ScalarType dtype, MaskKind kind, Momentum momentum, bool scaled) {
  SegmentFn fn = nullptr;
  dispatch_dtype("masked_sgd_", dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_mask(kind, [&](auto tag) {
      using Mask = decltype(tag);
      dispatch_bool(scaled, [&](auto sc) {
        constexpr bool kScaled = decltype(sc)::value;
        switch (momentum) {
          case Momentum::kNone: fn = &sgd_segment<T, Mask, Momentum::kNone, kScaled>; break;
          case Momentum::kFirst: fn = &sgd_segment<T, Mask, Momentum::kFirst, kScaled>; break;
          case Momentum::kRunning: fn = &sgd_segment<T, Mask, Momentum::kRunning, kScaled>; break;
        }
      });
    });
  });
  return fn;
}

// ---- the op -----------------------------------------------------------------------------------------------------------
void masked_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    const c10::List<std::optional<at::Tensor>>& masks, double lr, double weight_decay,
                    double momentum, double dampening, bool nesterov, bool maximize, bool first_step,
                    bool mask_update, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "masked_sgd_";
  const size_t n = params.size();
  const bool has_momentum = momentum != 0.0;
  std::vector<std::pair<const char*, size_t>> lengths = {{"params", n}, {"grads", grads.size()}, {"masks", masks.size()}};
  if (has_momentum) lengths.emplace_back("momentum_buffers", momentum_buffers.size());
  check_lengths(op, lengths);
  const Amp amp = read_amp(op, grad_scale, found_inf);
  const Momentum mode = !has_momentum ? Momentum::kNone : first_step ? Momentum::kFirst : Momentum::kRunning;

  std::vector<at::Tensor> holder;
  std::vector<Item> items(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_param(op, i, p);
    check_buffer(op, "grads", i, grads[i], p, true);
    if (has_momentum) check_buffer(op, "momentum_buffers", i, momentum_buffers[i], p, true);
    Item& it = items[i];
    const MaskKind kind = mask_of(op, i, masks.get(i), p, holder, &it.mask);
    it.fn = sgd_fn(p.scalar_type(), kind, mode, amp.scaled);
    it.param = p.data_ptr();
    it.grad = grads[i].data_ptr();
    it.state0 = has_momentum ? momentum_buffers[i].data_ptr() : nullptr;
    it.numel = p.numel();
  }
  if (amp.skip) return;

  Hyper h;
  h.grad_scale = amp.grad_scale;
  h.maximize = maximize;
  h.mask_update = mask_update;
  h.lr = lr;
  h.weight_decay = weight_decay;
  h.l2 = weight_decay != 0.0;
  h.momentum = momentum;
  h.one_minus_dampening = 1.0 - dampening;
  h.nesterov = nesterov;
  run_items(items, h);
}

}  // namespace
}  // namespace masked_optim
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CPU, m) {
  m.impl("masked_sgd_", &fastmask::masked_optim::masked_sgd_cpu);
}
