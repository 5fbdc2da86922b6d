// CPU kernel of fastmask::fisher_accumulate_: I_b += g_b^2 and I_l += g_l^2 (SWiFT Eqs. 7-8, docs/algorithm.md §3),
// for every tensor of the list in one OpenMP pass. The importances are float32 accumulators; gradients may be float32,
// float16, bfloat16 or float64 and are squared in float32 after rounding to float32, as the reference's
// `ib.add_(gb.float().square())` does, so the results are bit-identical to it.
#include <torch/library.h>
#include <torch/types.h>

#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cstring>
#include <vector>

#include "multi_tensor.h"

// I += g * g must round the product and the sum separately, as the reference does: no contraction into an FMA on
// the clones whose target has one.
#pragma GCC optimize("fp-contract=off")

namespace fastmask {
namespace {

// Elements per inner block: both pairs advance block by block, so the pass reads the four streams together.
constexpr int64_t kBlock = 2048;

inline float to_float(float v) { return v; }
inline float to_float(double v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) {
  // bfloat16 is the top half of a float32: widening is a 16-bit shift, exact.
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(c10::Half v) { return static_cast<float>(v); }  // exact

template <typename G>
__attribute__((always_inline)) inline void square_add(float* __restrict acc, const G* __restrict g, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float v = to_float(g[j]);
    acc[j] += v * v;
  }
}

template <typename G>
void square_add_base(float* acc, const void* g, int64_t n) {
  square_add(acc, static_cast<const G*>(g), n);
}

template <typename G>
FASTMASK_AVX2 void square_add_avx2(float* acc, const void* g, int64_t n) {
  square_add(acc, static_cast<const G*>(g), n);
}

#if defined(__x86_64__) && defined(__GNUC__)
// The compiler does not vectorise half -> float widening; F16C does 8 lanes per instruction.
template <>
FASTMASK_AVX2 void square_add_avx2<c10::Half>(float* acc, const void* g, int64_t n) {
  const auto* h = static_cast<const c10::Half*>(g);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + j)));
    _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), _mm256_mul_ps(v, v)));
  }
  square_add(acc + j, h + j, n - j);
}
#endif

using SquareAdd = void (*)(float*, const void*, int64_t);

SquareAdd square_add_for(at::ScalarType dtype, bool avx2) {
  switch (dtype) {
    case at::kFloat: return avx2 ? square_add_avx2<float> : square_add_base<float>;
    case at::kDouble: return avx2 ? square_add_avx2<double> : square_add_base<double>;
    case at::kHalf: return avx2 ? square_add_avx2<c10::Half> : square_add_base<c10::Half>;
    case at::kBFloat16: return avx2 ? square_add_avx2<c10::BFloat16> : square_add_base<c10::BFloat16>;
    default: return nullptr;
  }
}

// The accumulator and its gradient must be float32 / a float gradient on the CPU, and share one dense layout so
// that element j of one is element j of the other in memory.
void check_pair(const char* imp_name, const at::Tensor& imp, const char* grad_name, const at::Tensor& grad,
                size_t i) {
  TORCH_CHECK(imp.device().is_cpu() && grad.device().is_cpu(), "fisher_accumulate_ (cpp): ", imp_name, "[", i,
              "] (", describe(imp), ") and ", grad_name, "[", i, "] (", describe(grad), ") must be CPU tensors");
  TORCH_CHECK(imp.scalar_type() == at::kFloat, "fisher_accumulate_: ", imp_name, "[", i,
              "] must be a float32 accumulator, got ", describe(imp));
  TORCH_CHECK(square_add_for(grad.scalar_type(), false) != nullptr, "fisher_accumulate_: ", grad_name, "[", i,
              "] must be float32, float16, bfloat16 or float64, got ", describe(grad));
  TORCH_CHECK(imp.sizes() == grad.sizes(), "fisher_accumulate_: ", imp_name, "[", i, "] (", describe(imp), ") and ",
              grad_name, "[", i, "] (", describe(grad), ") differ in shape");
  TORCH_CHECK(same_dense_layout(imp, grad),
              "fisher_accumulate_: ", imp_name, "[", i, "] (", describe(imp), ") and ", grad_name, "[", i, "] (",
              describe(grad), ") must share one dense memory layout (e.g. both contiguous)");
}

struct Pair {
  float* imp;
  const char* grad;  // bytes, stepped by grad_size
  int64_t grad_size;
  SquareAdd fn;
};

void fisher_accumulate_cpu(at::TensorList imp_bias, at::TensorList imp_loss, at::TensorList grad_bias,
                           at::TensorList grad_loss) {
  const size_t n = imp_bias.size();
  TORCH_CHECK(imp_loss.size() == n && grad_bias.size() == n && grad_loss.size() == n,
              "fisher_accumulate_: list lengths differ: imp_bias ", n, ", imp_loss ", imp_loss.size(),
              ", grad_bias ", grad_bias.size(), ", grad_loss ", grad_loss.size());
  const bool avx2 = FASTMASK_HAS_AVX2();
  std::vector<int64_t> sizes(n);
  std::vector<Pair> bias(n), loss(n);
  for (size_t i = 0; i < n; ++i) {
    check_pair("imp_bias", imp_bias[i], "grad_bias", grad_bias[i], i);
    check_pair("imp_loss", imp_loss[i], "grad_loss", grad_loss[i], i);
    TORCH_CHECK(imp_bias[i].sizes() == imp_loss[i].sizes(), "fisher_accumulate_: imp_bias[", i, "] (",
                describe(imp_bias[i]), ") and imp_loss[", i, "] (", describe(imp_loss[i]), ") differ in shape");
    sizes[i] = imp_bias[i].numel();
    auto pair = [&](const at::Tensor& imp, const at::Tensor& grad) {
      return Pair{imp.data_ptr<float>(), static_cast<const char*>(grad.const_data_ptr()),
                  static_cast<int64_t>(grad.element_size()), square_add_for(grad.scalar_type(), avx2)};
    };
    bias[i] = pair(imp_bias[i], grad_bias[i]);
    loss[i] = pair(imp_loss[i], grad_loss[i]);
  }
  const std::vector<int64_t> offsets = prefix_offsets(sizes);
  const int64_t total = offsets.back();
  const int64_t chunks = chunk_count(0, total);
#pragma omp parallel for num_threads(threads_for(total)) schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const auto [lo, hi] = chunk(0, total, c);
    for_each_piece(offsets, lo, hi, [&](size_t i, int64_t b, int64_t e) {
      const Pair& pb = bias[i];
      const Pair& pl = loss[i];
      for (int64_t j = b; j < e; j += kBlock) {
        const int64_t m = std::min(kBlock, e - j);
        pb.fn(pb.imp + j, pb.grad + j * pb.grad_size, m);
        pl.fn(pl.imp + j, pl.grad + j * pl.grad_size, m);
      }
    });
  }
}

}  // namespace
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CPU, m) { m.impl("fisher_accumulate_", &fastmask::fisher_accumulate_cpu); }
