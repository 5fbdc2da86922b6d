// What the CPU kernels of fastmask::masked_adam_ (csrc/masked_adam.cpp) and fastmask::masked_sgd_
// (csrc/masked_sgd.cpp) share: branch-free helpers, storage types, mask kinds, the per-tensor work items and the
// parallel runner, the ISA dispatch of the element loops, and the argument checks. Semantics and oracle in
// fastmask/reference.py.
//
// One pass over memory per element: each op reads every tensor it needs and writes every tensor it updates once.
// All tensors of a call are laid end to end in one virtual index space and that space is split into one contiguous
// range per OpenMP thread, so 161 small tensors and one 300M tensor both keep every core busy, each thread streaming
// through memory in order.
//
// Arithmetic is in "opmath" (float32 for float32 / float16 / bfloat16 storage, as torch's fused optimizers; float64
// for float64) and follows torch.optim's single-tensor step operation by operation, including where torch's CPU
// kernels fuse a multiply-add (lerp, add(alpha=), addcmul), so float32 results match torch.optim.Adam / SGD
// (foreach=False) to the last bit or so. mask_update=False multiplies g by the mask M first (the papers' "grad"
// mode); mask_update=True takes the unmasked step and applies θ ← θ + M·(θ_new − θ), leaving parameter and state of
// entries with M == 0 bit for bit as they were (docs/algorithm.md §8.9-8.10).
//
// This header must be the first include of a kernel file: multiply-adds are contracted only where written as
// std::fma (where torch fuses), never behind our back, and the #pragma below must precede every include so that all
// inlined code of the file is compiled with the same options. libstdc++ defines _GLIBCXX_RELEASE in every one of
// its headers, so an include placed before this one is caught here.
#pragma once
#if defined(_GLIBCXX_RELEASE)
#error "masked_optim.h must be the first include: its #pragma GCC optimize must precede every other header"
#endif
#pragma GCC optimize("fp-contract=off", "no-trapping-math")

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastmask {
namespace masked_optim {

// ---- branch-free helpers ---------------------------------------------------------------------------------------------
// GCC 12 vectorises a loop only if it can if-convert every branch in it, and it gives up on `flag ? a : b` with a
// scalar bool flag, on short-circuit `||` and on c10's converters (which branch) once a loop holds several of them.
// So every choice in the loops below is a bitwise select on an all-ones / all-zeros mask: exact, and vectorisable.
template <size_t kBytes>
struct uint_of;
template <>
struct uint_of<2> {
  using type = uint16_t;
};
template <>
struct uint_of<4> {
  using type = uint32_t;
};
template <>
struct uint_of<8> {
  using type = uint64_t;
};
template <typename X>
using bits_t = typename uint_of<sizeof(X)>::type;

template <typename X>
inline bits_t<X> mask_of_bool(bool c) {  // all ones if c
  return static_cast<bits_t<X>>(bits_t<X>(0) - static_cast<bits_t<X>>(c));
}
template <typename X>
inline X choose(bits_t<X> on, X a, X b) {  // on ? a : b, bit by bit
  return __builtin_bit_cast(X, static_cast<bits_t<X>>((__builtin_bit_cast(bits_t<X>, a) & on) |
                                                       (__builtin_bit_cast(bits_t<X>, b) & ~on)));
}
template <typename X>
inline X choose(bool c, X a, X b) {
  return choose<X>(mask_of_bool<X>(c), a, b);
}
template <typename X>
inline X negate_if(bits_t<X> on, X a) {  // on ? -a : a, by the sign bit
  constexpr bits_t<X> sign = bits_t<X>(1) << (8 * sizeof(X) - 1);
  return __builtin_bit_cast(X, static_cast<bits_t<X>>(__builtin_bit_cast(bits_t<X>, a) ^ (on & sign)));
}

inline uint32_t bits_of(float x) { return __builtin_bit_cast(uint32_t, x); }
inline float float_of(uint32_t x) { return __builtin_bit_cast(float, x); }

// float -> bfloat16, round to nearest even, NaN -> 0x7FC0: c10::detail::round_to_nearest_even without its branch.
inline uint16_t bf16_from_float(float x) {
  const uint32_t u = bits_of(x);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return choose<uint16_t>(x != x, uint16_t{0x7FC0}, rounded);
}
inline float float_from_bf16(uint16_t x) { return float_of(static_cast<uint32_t>(x) << 16); }

// IEEE half <-> float: c10::detail::fp16_ieee_{to,from}_fp32_value (Maratea's bit tricks) with selects for branches.
inline float float_from_half(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = choose<uint32_t>(two_w < (1u << 27), bits_of(denormalized), bits_of(normalized));
  return float_of(sign | magnitude);
}
inline uint16_t half_from_float(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_of(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_of(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | choose<uint32_t>(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
}

// ---- storage types ------------------------------------------------------------------------------------------------
// The loops read and write raw storage (float, double, or the 16 bits of a half / bfloat16), because GCC does not
// vectorise loops over the c10::Half / c10::BFloat16 structs.
template <typename T>
struct Storage {  // float, double
  using raw = T;
  using acc = T;
  static acc load(raw x) { return x; }
  static raw store(acc x) { return x; }
};
template <>
struct Storage<c10::Half> {
  using raw = uint16_t;
  using acc = float;
  static acc load(raw x) { return float_from_half(x); }
  static raw store(acc x) { return half_from_float(x); }
};
template <>
struct Storage<c10::BFloat16> {
  using raw = uint16_t;
  using acc = float;
  static acc load(raw x) { return float_from_bf16(x); }
  static raw store(acc x) { return bf16_from_float(x); }
};

// ---- mask storage kinds -------------------------------------------------------------------------------------------
// Each kind turns its storage into the float32 mask value of fastmask.reference.mask_as_float.
struct NoMask {
  using storage = uint8_t;
  static constexpr bool present = false;
  static float value(storage) { return 1.0f; }
};
template <typename T>
struct FloatMask {  // float32 / bf16 / fp16 soft masks, as they are
  using storage = typename Storage<T>::raw;
  static constexpr bool present = true;
  static float value(storage m) { return Storage<T>::load(m); }
};
struct QuantisedMask {  // uint8 soft mask, m / 255 (a true division, as the reference's tensor division)
  using storage = uint8_t;
  static constexpr bool present = true;
  static float value(storage m) { return static_cast<float>(m) / 255.0f; }
};
struct HardMask {  // bool, read as its byte
  using storage = uint8_t;
  static constexpr bool present = true;
  static float value(storage m) { return choose<float>(m != 0, 1.0f, 0.0f); }
};

enum class MaskKind { kNone, kFloat, kBFloat16, kHalf, kUInt8, kBool };

// Calls f(MaskTag{}) for the mask kind; the kind is resolved once per tensor, outside the element loop.
template <typename F>
void dispatch_mask(MaskKind kind, F&& f) {
  switch (kind) {
    case MaskKind::kNone: return f(NoMask{});
    case MaskKind::kFloat: return f(FloatMask<float>{});
    case MaskKind::kBFloat16: return f(FloatMask<c10::BFloat16>{});
    case MaskKind::kHalf: return f(FloatMask<c10::Half>{});
    case MaskKind::kUInt8: return f(QuantisedMask{});
    case MaskKind::kBool: return f(HardMask{});
  }
}

// ---- per-tensor work items ------------------------------------------------------------------------------------------
struct Hyper;
struct Item;
using SegmentFn = void (*)(const Item&, int64_t, int64_t, const Hyper&);

struct Item {
  SegmentFn fn = nullptr;
  void* param = nullptr;
  const void* grad = nullptr;
  void* state0 = nullptr;  // Adam: exp_avg; SGD: momentum_buffer
  void* state1 = nullptr;  // Adam: exp_avg_sq
  void* state2 = nullptr;  // Adam: max_exp_avg_sq (amsgrad)
  const void* mask = nullptr;
  int64_t numel = 0;
  double step_size = 0.0;  // Adam: lr / (1 − β1^t)
  double bc2_sqrt = 0.0;   // Adam: (1 − β2^t)^0.5
};

// Hyperparameters as the schema's doubles; derived ones (1 − β1, 1 − lr·λ, …) are computed in double as Python
// computes them, and each segment converts them to its opmath type.
struct Hyper {
  double grad_scale = 1.0;
  bool maximize = false;
  bool mask_update = false;
  // Adam
  double lerp_weight = 0.0;  // 1 − β1
  double beta2 = 0.0, one_minus_beta2 = 0.0, eps = 0.0;
  double weight_decay = 0.0;  // L2 (Adam) or SGD's weight decay
  bool l2 = false, decoupled = false;
  double decay_factor = 1.0;  // 1 − lr·λ (AdamW)
  // SGD
  double lr = 0.0, momentum = 0.0, one_minus_dampening = 0.0;
  bool nesterov = false;
};

// Runs every item's segments on all threads: the concatenation of the items is split into one contiguous range
// per thread (aligned to a cache line of float32), and each thread walks the items overlapping its range.
inline void run_items(const std::vector<Item>& items, const Hyper& h) {
  std::vector<int64_t> offset(items.size() + 1, 0);
  for (size_t i = 0; i < items.size(); ++i) offset[i + 1] = offset[i] + items[i].numel;
  const int64_t total = offset.back();
  if (total == 0) return;
  // Below this a parallel region costs more than it saves.
  constexpr int64_t kSerialBelow = 1 << 15;
  constexpr int64_t kAlign = 16;
  const int threads = (total < kSerialBelow || at::in_parallel_region()) ? 1 : at::get_num_threads();
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    auto bound = [&](int64_t t) {
      if (t >= nt) return total;
      return std::min(total, (total * t / nt) / kAlign * kAlign);
    };
    const int64_t lo = bound(tid), hi = bound(tid + 1);
    if (lo < hi) {
      size_t i = std::upper_bound(offset.begin(), offset.end(), lo) - offset.begin() - 1;
      for (; i < items.size() && offset[i] < hi; ++i) {
        const int64_t a = std::max(lo, offset[i]) - offset[i], b = std::min(hi, offset[i + 1]) - offset[i];
        if (a < b) items[i].fn(items[i], a, b, h);
      }
    }
  }
}

// ---- ISA dispatch of the element loops --------------------------------------------------------------------------------
// The element loops (adam_segment, sgd_segment) are plain loops over restrict pointers that GCC vectorises. On x86-64
// each loop is compiled for AVX-512, AVX2+FMA and baseline x86-64 and the best one is picked at load time (std::fma
// is one instruction in the first two; the baseline only serves pre-2013 CPUs). The divider is the busiest unit
// (Adam: √v / √bc2 and m / denom), so the division by grad_scale is compiled in only when a grad_scale is given
// (kScaled).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTMASK_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTMASK_VECTOR_CLONES
#endif

// ---- argument checks --------------------------------------------------------------------------------------------------
inline std::string at_index(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

inline bool supported_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Every buffer of tensor i must be a CPU tensor of the param's dtype and shape with the param's memory layout (a
// dense, non-overlapping layout, so the kernel can walk all of them by one flat index).
inline void check_buffer(const char* op, const char* list, size_t i, const at::Tensor& t, const at::Tensor& param,
                         bool same_dtype) {
  const std::string name = at_index(list, i);
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), "; this kernel runs CPU tensors");
  TORCH_CHECK(!same_dtype || t.scalar_type() == param.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but params[", i, "] has dtype ", param.scalar_type());
  TORCH_CHECK(t.sizes() == param.sizes(), op, ": ", name, " has shape ", t.sizes(), " but params[", i,
              "] has shape ", param.sizes());
  TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": ", name,
              " is not contiguous (strides ", t.strides(), "); pass a contiguous tensor");
  TORCH_CHECK(t.strides() == param.strides(), op, ": ", name, " has strides ", t.strides(), " but params[", i,
              "] has strides ", param.strides(), "; give every buffer the parameter's memory layout");
}

inline void check_param(const char* op, size_t i, const at::Tensor& p) {
  TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined");
  TORCH_CHECK(p.device().is_cpu(), op, ": params[", i, "] is on ", p.device(), "; this kernel runs CPU tensors");
  TORCH_CHECK(supported_param_dtype(p.scalar_type()), op, ": params[", i, "] has dtype ", p.scalar_type(),
              "; supported: float32, float64, float16, bfloat16");
  TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i, "] is not contiguous (strides ", p.strides(),
              "); pass a contiguous tensor");
}

inline void check_lengths(const char* op, const std::vector<std::pair<const char*, size_t>>& lists) {
  for (const auto& [name, n] : lists) {
    if (n != lists.front().second) {
      std::string msg = std::string(op) + ": list lengths differ:";
      for (const auto& [nm, k] : lists) msg += std::string(" ") + nm + " " + std::to_string(k);
      TORCH_CHECK(false, msg);
    }
  }
}

// The mask of tensor i, as its kind and a pointer. A float64 mask is narrowed to float32 first, as
// fastmask.reference.mask_as_float does (`holder` keeps the copy alive).
inline MaskKind mask_of(const char* op, size_t i, const std::optional<at::Tensor>& mask, const at::Tensor& param,
                        std::vector<at::Tensor>& holder, const void** ptr) {
  *ptr = nullptr;
  if (!mask.has_value() || !mask->defined()) return MaskKind::kNone;
  at::Tensor m = *mask;
  check_buffer(op, "masks", i, m, param, /*same_dtype=*/false);
  if (m.scalar_type() == at::kDouble) {
    m = m.to(at::kFloat);
    holder.push_back(m);
  }
  *ptr = m.data_ptr();
  switch (m.scalar_type()) {
    case at::kFloat: return MaskKind::kFloat;
    case at::kBFloat16: return MaskKind::kBFloat16;
    case at::kHalf: return MaskKind::kHalf;
    case at::kByte: return MaskKind::kUInt8;
    case at::kBool: return MaskKind::kBool;
    default:
      TORCH_CHECK(false, op, ": masks[", i, "] has dtype ", m.scalar_type(),
                  "; supported: float32, bfloat16, float16, uint8 (m/255) or bool");
  }
}

// Reads a 0-d CPU tensor as a double without a dispatcher round trip for the common dtypes.
inline double scalar_of(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return *t.const_data_ptr<float>();
  if (t.scalar_type() == at::kDouble) return *t.const_data_ptr<double>();
  return t.item<double>();
}

// grad_scale / found_inf: one-element CPU tensors, read once per call.
struct Amp {
  bool skip = false;        // found_inf is non-zero: the whole step is skipped, as in torch's fused optimizers
  bool scaled = false;      // a grad_scale is given
  double grad_scale = 1.0;  // g ← g / grad_scale
};

inline Amp read_amp(const char* op, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  Amp amp;
  for (const auto& [name, t] : {std::pair{"grad_scale", &grad_scale}, std::pair{"found_inf", &found_inf}}) {
    if (t->has_value() && (*t)->defined()) {
      TORCH_CHECK((*t)->device().is_cpu(), op, ": ", name, " is on ", (*t)->device(), "; expected a CPU tensor");
      TORCH_CHECK((*t)->numel() == 1, op, ": ", name, " must have one element, got shape ", (*t)->sizes());
    }
  }
  amp.skip = found_inf.has_value() && found_inf->defined() && scalar_of(*found_inf) != 0.0;
  if (grad_scale.has_value() && grad_scale->defined()) {
    amp.scaled = true;
    // The reference divides by grad_scale.float().
    amp.grad_scale = static_cast<float>(scalar_of(*grad_scale));
  }
  return amp;
}

// The element loop of one tensor, chosen once per tensor from its dtype and mask kind.
template <typename F>
void dispatch_dtype(const char* op, at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

// Calls f(std::bool_constant<b>{}): a runtime flag as a template argument.
template <typename F>
void dispatch_bool(bool b, F&& f) {
  if (b) return f(std::true_type{});
  return f(std::false_type{});
}

}  // namespace masked_optim
}  // namespace fastmask
