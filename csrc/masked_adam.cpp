// CPU kernel of fastmask::masked_adam_ (schema in csrc/ops.cpp; semantics and oracle in fastmask/reference.py): one
// pass over memory per element, reading p, g, m, v (, v_max) and the mask and writing p, m, v (, v_max) once. What
// it shares with masked_sgd_ (storage types, mask kinds, the parallel runner, ISA dispatch, argument checks) and the
// rules both follow are in csrc/masked_optim.h.
//
// Opmath arithmetic, operation by operation as torch.optim.Adam's single-tensor step:
//   g ← g + λθ (L2) or θ ← θ(1 − lr·λ) (decoupled);  m ← m + (1−β1)(g − m);  v ← v·β2 + ((1−β2)·g)·g;
//   θ ← θ − (lr/bc1 · m) / (√v / √bc2 + eps),  bc1 = 1 − β1^t, √bc2 = (1 − β2^t)^0.5 in double, per tensor.

// First include: masked_optim.h turns off FP contraction (multiply-adds are fused only where written as std::fma)
// with a #pragma that must precede every other header.
#include "masked_optim.h"

#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

namespace fastmask {
namespace masked_optim {
namespace {

template <typename T, typename Mask, bool kAmsgrad, bool kScaled>
FASTMASK_VECTOR_CLONES void adam_segment(const Item& it, int64_t lo, int64_t hi, const Hyper& h) {
  using S = Storage<T>;
  using raw = typename S::raw;
  using acc = typename S::acc;
  raw* __restrict__ p = static_cast<raw*>(it.param);
  const raw* __restrict__ g = static_cast<const raw*>(it.grad);
  raw* __restrict__ m = static_cast<raw*>(it.state0);
  raw* __restrict__ v = static_cast<raw*>(it.state1);
  raw* __restrict__ vmax = static_cast<raw*>(it.state2);
  const typename Mask::storage* __restrict__ mk = static_cast<const typename Mask::storage*>(it.mask);
  // Python scalars become opmath scalars, as when torch applies them to an opmath tensor.
  const acc neg_step_size = -static_cast<acc>(it.step_size), bc2_sqrt = static_cast<acc>(it.bc2_sqrt);
  const acc scale = static_cast<acc>(h.grad_scale), eps = static_cast<acc>(h.eps);
  const acc wd = static_cast<acc>(h.weight_decay), decay_factor = static_cast<acc>(h.decoupled ? h.decay_factor : 1.0);
  const acc beta2 = static_cast<acc>(h.beta2), one_minus_beta2 = static_cast<acc>(h.one_minus_beta2);
  // torch's lerp(m, g, w): fma(w, g − m, m) for |w| < 0.5, else fma(w − 1, g − m, g).
  const acc w = static_cast<acc>(h.lerp_weight);
  const bool small = std::abs(w) < acc(0.5);
  const acc lerp_coeff = small ? w : w - acc(1);
  const bits_t<acc> lerp_small = mask_of_bool<acc>(small), maximize = mask_of_bool<acc>(h.maximize), l2 = mask_of_bool<acc>(h.l2);
  const bool update_mode = Mask::present && h.mask_update;
  const bits_t<acc> update = mask_of_bool<acc>(update_mode);
  // An entry is kept as it is when its mask equals keep_at: 0 in update mode, never (NaN) otherwise.
  const float keep_at = update_mode ? 0.0f : std::numeric_limits<float>::quiet_NaN();
  // Distinct tensors, element j depends on element j only: no runtime alias checks (GCC would give up at ~10).
#pragma GCC ivdep
  for (int64_t j = lo; j < hi; ++j) {
    const raw p_raw = p[j], m_raw = m[j], v_raw = v[j];
    const acc theta = S::load(p_raw);
    acc grad = S::load(g[j]);
    if constexpr (kScaled) grad = grad / scale;
    grad = negate_if(maximize, grad);
    float mval = 1.0f;
    if constexpr (Mask::present) {
      mval = Mask::value(mk[j]);
      grad = choose<acc>(update, grad, grad * static_cast<acc>(mval));
    }
    grad = choose<acc>(l2, std::fma(theta, wd, grad), grad);  // grad.add(param, alpha=λ)
    const acc decayed = theta * decay_factor;          // param.mul_(1 − lr·λ); exact when the factor is 1
    const acc m_old = S::load(m_raw), v_old = S::load(v_raw);
    const acc m_new = std::fma(lerp_coeff, grad - m_old, choose<acc>(lerp_small, m_old, grad));
    const acc v_new = std::fma(one_minus_beta2 * grad, grad, v_old * beta2);  // v.mul_(β2).addcmul_(g, g, 1 − β2)
    acc v_hat = v_new;
    raw vmax_raw{};
    if constexpr (kAmsgrad) {
      vmax_raw = vmax[j];
      const acc vmax_old = S::load(vmax_raw);
      v_hat = choose<acc>(static_cast<bool>((vmax_old != vmax_old) | (vmax_old > v_new)), vmax_old, v_new);  // NaN-propagating max
    }
    const acc denom = std::sqrt(v_hat) / bc2_sqrt + eps;
    const acc p_new = decayed + (neg_step_size * m_new) / denom;  // param.addcdiv_(m, denom, value=−lr/bc1)
    if constexpr (Mask::present) {
      // Update mode: entries with M == 0 keep their stored bits; the rest move by M·Δθ.
      const bool keep = mval == keep_at;
      const acc p_out = choose<acc>(update, theta + static_cast<acc>(mval) * (p_new - theta), p_new);
      p[j] = choose<raw>(keep, p_raw, S::store(p_out));
      m[j] = choose<raw>(keep, m_raw, S::store(m_new));
      v[j] = choose<raw>(keep, v_raw, S::store(v_new));
      if constexpr (kAmsgrad) vmax[j] = choose<raw>(keep, vmax_raw, S::store(v_hat));
    } else {
      p[j] = S::store(p_new);
      m[j] = S::store(m_new);
      v[j] = S::store(v_new);
      if constexpr (kAmsgrad) vmax[j] = S::store(v_hat);
    }
  }
}

SegmentFn adam_fn(at::ScalarType dtype, MaskKind kind, bool amsgrad, bool scaled) {
  SegmentFn fn = nullptr;
  dispatch_dtype("masked_adam_", dtype, [&](auto t) {
    dispatch_mask(kind, [&](auto tag) {
      dispatch_bool(amsgrad, [&](auto ams) {
        dispatch_bool(scaled, [&](auto sc) {
          fn = &adam_segment<decltype(t), decltype(tag), decltype(ams)::value, decltype(sc)::value>;
        });
      });
    });
  });
  return fn;
}

// ---- the op -----------------------------------------------------------------------------------------------------------
void masked_adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                     const c10::List<std::optional<at::Tensor>>& masks, double lr, double beta1, double beta2,
                     double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                     bool mask_update, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "masked_adam_";
  const size_t n = params.size();
  std::vector<std::pair<const char*, size_t>> lengths = {
      {"params", n},
      {"grads", grads.size()},
      {"exp_avgs", exp_avgs.size()},
      {"exp_avg_sqs", exp_avg_sqs.size()},
      {"state_steps", state_steps.size()},
      {"masks", masks.size()}};
  if (amsgrad) lengths.emplace_back("max_exp_avg_sqs", max_exp_avg_sqs.size());
  check_lengths(op, lengths);
  // Every argument is checked before found_inf can skip the step, so a bad call fails on every step.
  const Amp amp = read_amp(op, grad_scale, found_inf);

  std::vector<at::Tensor> holder;
  std::vector<Item> items(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_param(op, i, p);
    check_buffer(op, "grads", i, grads[i], p, true);
    check_buffer(op, "exp_avgs", i, exp_avgs[i], p, true);
    check_buffer(op, "exp_avg_sqs", i, exp_avg_sqs[i], p, true);
    if (amsgrad) check_buffer(op, "max_exp_avg_sqs", i, max_exp_avg_sqs[i], p, true);
    const at::Tensor& s = state_steps[i];
    TORCH_CHECK(s.defined() && s.device().is_cpu() && s.numel() == 1, op, ": state_steps[", i,
                "] must be a one-element CPU tensor");
    Item& it = items[i];
    const MaskKind kind = mask_of(op, i, masks.get(i), p, holder, &it.mask);
    it.fn = adam_fn(p.scalar_type(), kind, amsgrad, amp.scaled);
    it.param = p.data_ptr();
    it.grad = grads[i].data_ptr();
    it.state0 = exp_avgs[i].data_ptr();
    it.state1 = exp_avg_sqs[i].data_ptr();
    it.state2 = amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
    it.numel = p.numel();
    // Bias corrections in double from the (already incremented) step, as torch.optim.Adam computes them in Python
    // (`1 - beta1 ** step`, `(1 - beta2 ** step) ** 0.5`).
    const double step = scalar_of(s);
    it.step_size = lr / (1.0 - std::pow(beta1, step));
    it.bc2_sqrt = std::pow(1.0 - std::pow(beta2, step), 0.5);
  }
  if (amp.skip) return;

  Hyper h;
  h.grad_scale = amp.grad_scale;
  h.maximize = maximize;
  h.mask_update = mask_update;
  h.lerp_weight = 1.0 - beta1;
  h.beta2 = beta2;
  h.one_minus_beta2 = 1.0 - beta2;
  h.eps = eps;
  h.weight_decay = weight_decay;
  h.l2 = weight_decay != 0.0 && !decoupled_weight_decay;
  h.decoupled = weight_decay != 0.0 && decoupled_weight_decay;
  h.decay_factor = 1.0 - lr * weight_decay;
  run_items(items, h);
}

}  // namespace
}  // namespace masked_optim
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CPU, m) {
  m.impl("masked_adam_", &fastmask::masked_optim::masked_adam_cpu);
}
