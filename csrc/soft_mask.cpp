// CPU kernels of fastmask::soft_mask and its in-place form soft_mask_ (SWiFT Eq. 9, docs/algorithm.md §4), per
// tensor t:
//     Norm(x) = (x - min_t x) / ((max_t x - min_t x) + eps), or x itself when max_t x == min_t x,
//     R = Norm(I_b) / (Norm(I_l) + eps),   M = tanh(R) (apply_tanh) or R (BMFT's score).
// The arithmetic is the reference's, in float32 and in its order (subtract, add eps, divide — never a reciprocal),
// so R is bit-identical to fastmask.reference.soft_mask; tanh is a vectorisable float32 tanh within 1.5 ulp (the
// reference's torch.tanh is within 1 ulp).
//
// bounds (optional, float32 [4, n]: rows lo_b, hi_b, lo_l, hi_l, one column per tensor) gives min_t and max_t
// instead: the min and max of the whole tensor that tensor t is a piece of (a shard, fastmask/parallel/fsdp.py).
// A NaN among a tensor's bounds makes its mask NaN, as a NaN in the data does without bounds.
//
// Passes: per tensor, one reduction reading both importances (min and max of each; skipped when bounds are given),
// then one pass writing M. Tensors are processed in batches that fit in the last-level cache, and the writing pass
// walks each batch backwards, so the second read of the importances mostly hits the cache: the DRAM traffic
// approaches the compulsory 12 bytes per element (read I_b, read I_l, write M) instead of a two-pass kernel's 20.
// soft_mask_ writes M over I_b, which saves the mask allocation (memory and first-touch page faults).
#include <omp.h>
#include <sys/mman.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "multi_tensor.h"

namespace fastmask {
namespace {

// Input elements (of both importances) per cache batch: 2 x 4 B x 1.5M = 12 MB, within the shared 32 MB L3 of
// the machines this was tuned on and still a win on smaller ones (the reversed second pass reuses what is left).
constexpr int64_t kBatchElements = 3 << 19;
// Elements per block of the writing pass (walked backwards block by block, forwards inside a block).
constexpr int64_t kBlock = 4096;
// Outputs this large are allocated on transparent huge pages: a fresh 4 KiB-page allocation costs one page fault
// per 1024 floats, which took longer than the whole kernel on a 23.5M-element mask set.
constexpr int64_t kHugePageBytes = 2 << 20;
constexpr int64_t kHugeOutputBytes = 2 * kHugePageBytes;

// Sixteen float32 lanes as a GCC vector: the element transform is written on these so it is vectorised whatever the
// compiler's if-conversion decides (plain loops with tanh's selects were left scalar). The baseline clone lowers
// them to SSE operations, the AVX2 clone to pairs of ymm operations, the AVX-512 clone to single zmm operations.
typedef float f32v __attribute__((vector_size(64)));
typedef int32_t i32v __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

// exp(y) for y in [0, 20] (the large branch of tanh): y = n ln2 + r with ln2 split in two so n ln2 is exact,
// |r| <= ln2 / 2, Cephes' degree-6 minimax polynomial, 2^n built in the exponent field.
__attribute__((always_inline)) inline f32v exp_small_positive(f32v y) {
  const i32v ni = __builtin_convertvector(y * 1.44269504088896341f + 0.5f, i32v);  // floor(y / ln2 + 1/2)
  const f32v n = __builtin_convertvector(ni, f32v);
  f32v r = y - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  f32v p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return p * reinterpret_cast<f32v>((ni + 127) << 23);
}

// tanh(x) in float32: an odd polynomial below |x| = 0.625 (Cephes), 1 - 2 / (e^{2|x|} + 1) above, 1 from
// |x| = 10 on (tanh(10) rounds to 1 in float32); sign restored. The clamps keep NaN (a comparison with NaN is false),
// so NaN flows through the arithmetic to the result.
__attribute__((always_inline)) inline f32v tanh_f32(f32v x) {
  const i32v bits = reinterpret_cast<i32v>(x);
  const f32v a = reinterpret_cast<f32v>(bits & 0x7fffffff);
  const f32v s = a > 0.625f ? 0.625f : a;  // the polynomial's own range
  const f32v z = s * s;
  f32v p = z * -5.70498872745e-3f + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const f32v small = p * z * s + s;
  const f32v e = exp_small_positive(2.0f * (a > 10.0f ? 10.0f : a));
  const f32v large = 1.0f - 2.0f / (e + 1.0f);
  const f32v t = a < 0.625f ? small : large;
  return reinterpret_cast<f32v>(reinterpret_cast<i32v>(t) | (bits & INT32_MIN));
}

// Per-thread partial min / max of both importances of one tensor.
struct Bounds {
  float lo_b = std::numeric_limits<float>::infinity();
  float hi_b = -std::numeric_limits<float>::infinity();
  float lo_l = std::numeric_limits<float>::infinity();
  float hi_l = -std::numeric_limits<float>::infinity();
  int nan = 0;  // a NaN anywhere makes min and max NaN, as torch's min() / max() do
};

// Tensor i's bounds from the given [4, n] array (rows lo_b, hi_b, lo_l, hi_l); a NaN among them sets the flag.
Bounds given_bounds(const float* g, size_t n, size_t i) {
  const float lo_b = g[i], hi_b = g[n + i], lo_l = g[2 * n + i], hi_l = g[3 * n + i];
  return {lo_b, hi_b, lo_l, hi_l, std::isnan(lo_b) || std::isnan(hi_b) || std::isnan(lo_l) || std::isnan(hi_l)};
}

// Tensor i's bounds: the merge of the threads' partial bounds partial[u * n + i], u < threads.
Bounds merged_bounds(const std::vector<Bounds>& partial, int threads, size_t n, size_t i) {
  Bounds all;
  for (int u = 0; u < threads; ++u) {
    const Bounds& p = partial[u * n + i];
    all.lo_b = std::min(all.lo_b, p.lo_b);
    all.hi_b = std::max(all.hi_b, p.hi_b);
    all.lo_l = std::min(all.lo_l, p.lo_l);
    all.hi_l = std::max(all.hi_l, p.hi_l);
    all.nan |= p.nan;
  }
  return all;
}

__attribute__((always_inline)) inline void minmax2(const float* __restrict b, const float* __restrict l, int64_t n,
                                                   Bounds& out) {
  float lb = out.lo_b, hb = out.hi_b, ll = out.lo_l, hl = out.hi_l;
  int nan = 0;
#pragma omp simd reduction(min : lb, ll) reduction(max : hb, hl) reduction(| : nan)
  for (int64_t j = 0; j < n; ++j) {
    const float x = b[j], y = l[j];
    lb = std::min(lb, x);
    hb = std::max(hb, x);
    ll = std::min(ll, y);
    hl = std::max(hl, y);
    nan |= (x != x) | (y != y);
  }
  out = Bounds{lb, hb, ll, hl, out.nan | nan};
}

// Norm(x) = (x - lo) / d with d = (hi - lo) + eps; the guard (hi == lo, raw x) is lo = 0, d = 1, which is exact.
struct Norm {
  float lo, d;
};

template <bool kTanh>
__attribute__((always_inline)) inline f32v mask_of(f32v b, f32v l, Norm nb, Norm nl, float eps) {
  const f32v r = ((b - nb.lo) / nb.d) / ((l - nl.lo) / nl.d + eps);
  return kTanh ? tanh_f32(r) : r;
}

template <bool kTanh>
__attribute__((always_inline)) inline void write_mask(const float* b, const float* l, float* out, int64_t n,
                                                      Norm nb, Norm nl, float eps) {
  // b and out may be the same array (the in-place soft_mask_): each vector is loaded before it is stored.
  f32v vb, vl, m;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    std::memcpy(&vb, b + j, sizeof vb);
    std::memcpy(&vl, l + j, sizeof vl);
    m = mask_of<kTanh>(vb, vl, nb, nl, eps);
    std::memcpy(out + j, &m, sizeof m);
  }
  if (j < n) {  // the tail, through zero-padded lanes whose results are dropped
    vb = f32v{};
    vl = f32v{};
    std::memcpy(&vb, b + j, (n - j) * sizeof(float));
    std::memcpy(&vl, l + j, (n - j) * sizeof(float));
    m = mask_of<kTanh>(vb, vl, nb, nl, eps);
    std::memcpy(out + j, &m, (n - j) * sizeof(float));
  }
}

// Both element loops, for the x86-64 baseline, AVX2 and (the writing pass) AVX-512.
using WriteFn = void (*)(const float*, const float*, float*, int64_t, Norm, Norm, float);
void minmax2_base(const float* b, const float* l, int64_t n, Bounds& out) { minmax2(b, l, n, out); }
FASTMASK_AVX2 void minmax2_avx2(const float* b, const float* l, int64_t n, Bounds& out) { minmax2(b, l, n, out); }
template <bool kTanh>
void write_base(const float* b, const float* l, float* out, int64_t n, Norm nb, Norm nl, float eps) {
  write_mask<kTanh>(b, l, out, n, nb, nl, eps);
}
#if defined(__x86_64__) && defined(__GNUC__)
template <bool kTanh>
FASTMASK_AVX2 void write_avx2(const float* b, const float* l, float* out, int64_t n, Norm nb, Norm nl, float eps) {
  write_mask<kTanh>(b, l, out, n, nb, nl, eps);
}
template <bool kTanh>
FASTMASK_AVX512 void write_avx512(const float* b, const float* l, float* out, int64_t n, Norm nb, Norm nl,
                                  float eps) {
  write_mask<kTanh>(b, l, out, n, nb, nl, eps);
}
#endif

WriteFn pick_write(bool apply_tanh) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (FASTMASK_HAS_AVX512()) return apply_tanh ? write_avx512<true> : write_avx512<false>;
  if (FASTMASK_HAS_AVX2()) return apply_tanh ? write_avx2<true> : write_avx2<false>;
#endif
  return apply_tanh ? write_base<true> : write_base<false>;
}

Norm norm_of(float lo, float hi, bool nan, float eps) {
  if (nan) return {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::quiet_NaN()};
  if (hi == lo) return {0.0f, 1.0f};
  return {lo, (hi - lo) + eps};
}

// A float32 tensor of `sizes`; large ones on transparent huge pages (see kHugeOutputBytes).
at::Tensor new_output(at::IntArrayRef sizes, int64_t numel) {
  const auto options = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  const int64_t bytes = numel * static_cast<int64_t>(sizeof(float));
  if (bytes < kHugeOutputBytes) return at::empty(sizes, options);
  void* data = nullptr;
  TORCH_CHECK(posix_memalign(&data, kHugePageBytes, bytes) == 0, "soft_mask: cannot allocate ", bytes,
              " bytes for a mask of shape ", sizes);
  madvise(data, (bytes + 4095) / 4096 * 4096, MADV_HUGEPAGE);  // a hint: without THP the pages are just small
  return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
}

// The two passes over tensors i = 0..n-1 of sizes[i] elements: importances pb[i], pl[i], masks written to po[i]
// (which may be pb[i]: the in-place soft_mask_). `given`: the bounds as a contiguous float32 [4, n] array, or
// nullptr; when given, pass 1 is skipped.
void run_passes(const std::vector<const float*>& pb, const std::vector<const float*>& pl,
                const std::vector<float*>& po, const std::vector<int64_t>& sizes, float eps, bool apply_tanh,
                const float* given) {
  const size_t n = sizes.size();
  const std::vector<int64_t> offsets = prefix_offsets(sizes);
  // Cache batches: runs of whole tensors of at most kBatchElements elements (a larger tensor is a batch alone).
  std::vector<size_t> batch_starts{0};
  for (size_t i = 0; i < n; ++i) {
    if (offsets[i + 1] - offsets[batch_starts.back()] > kBatchElements && i > batch_starts.back()) {
      batch_starts.push_back(i);
    }
  }
  batch_starts.push_back(n);

  const auto minmax_fn = FASTMASK_HAS_AVX2() ? minmax2_avx2 : minmax2_base;
  const WriteFn write_fn = pick_write(apply_tanh);
  const int nt = threads_for(offsets.back());
  std::vector<Bounds> partial(given ? 0 : static_cast<size_t>(nt) * n);  // partial[t * n + i]

#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), threads = omp_get_num_threads();
    for (size_t k = 0; k + 1 < batch_starts.size(); ++k) {
      const int64_t begin = offsets[batch_starts[k]], end = offsets[batch_starts[k + 1]];
      const int64_t chunks = chunk_count(begin, end);
      // Pass 1: min / max of both importances. The loop's closing barrier leaves every partial of the batch
      // complete; the next batch's partials belong to other tensors, so pass 2 needs no barrier of its own.
      if (!given) {
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks; ++c) {
          const auto [lo, hi] = chunk(begin, end, c);
          for_each_piece(offsets, lo, hi, [&](size_t i, int64_t b, int64_t e) {
            minmax_fn(pb[i] + b, pl[i] + b, e - b, partial[t * n + i]);
          });
        }
      }
      // Pass 2, backwards: what pass 1 read last is still in the cache.
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t c = chunks - 1; c >= 0; --c) {
        const auto [lo, hi] = chunk(begin, end, c);
        std::vector<std::array<int64_t, 3>> pieces;
        for_each_piece(offsets, lo, hi, [&](size_t i, int64_t b, int64_t e) { pieces.push_back({int64_t(i), b, e}); });
        for (auto it = pieces.rbegin(); it != pieces.rend(); ++it) {
          const auto [i, b, e] = *it;
          const Bounds all = given ? given_bounds(given, n, i) : merged_bounds(partial, threads, n, i);
          const Norm nb = norm_of(all.lo_b, all.hi_b, all.nan, eps);
          const Norm nl = norm_of(all.lo_l, all.hi_l, all.nan, eps);
          for (int64_t stop = e; stop > b; stop -= kBlock) {
            const int64_t start = std::max(b, stop - kBlock);
            write_fn(pb[i] + start, pl[i] + start, po[i] + start, stop - start, nb, nl, eps);
          }
        }
      }
    }
  }
}

// Checks pair i of either op: CPU, same shape, floating point.
void check_pair(const char* op, size_t i, const at::Tensor& b, const at::Tensor& l) {
  TORCH_CHECK(b.device().is_cpu() && l.device().is_cpu(), op, " (cpp): imp_bias[", i, "] (", describe(b),
              ") and imp_loss[", i, "] (", describe(l), ") must be CPU tensors");
  TORCH_CHECK(b.sizes() == l.sizes(), op, ": imp_bias[", i, "] (", describe(b), ") and imp_loss[", i, "] (",
              describe(l), ") differ in shape");
  TORCH_CHECK(at::isFloatingType(b.scalar_type()) && at::isFloatingType(l.scalar_type()), op, ": imp_bias[", i,
              "] (", describe(b), ") and imp_loss[", i, "] (", describe(l), ") must be floating point");
}

// The given bounds of either op as a contiguous float32 CPU tensor of shape [4, n], or an undefined tensor.
at::Tensor checked_bounds(const char* op, const std::optional<at::Tensor>& bounds, size_t n) {
  if (!bounds.has_value()) return {};
  const at::Tensor& g = *bounds;
  TORCH_CHECK_VALUE(g.scalar_type() == at::kFloat && g.dim() == 2 && g.size(0) == 4 &&
                        g.size(1) == static_cast<int64_t>(n),
                    op, ": bounds (", describe(g), ") must be a float32 tensor of shape [4, ", n,
                    "]: rows lo_b, hi_b, lo_l, hi_l, one column per tensor");
  return g.to(at::kCPU).contiguous();
}

std::vector<at::Tensor> soft_mask_cpu(at::TensorList imp_bias, at::TensorList imp_loss, double eps,
                                      bool apply_tanh, const std::optional<at::Tensor>& bounds) {
  const size_t n = imp_bias.size();
  TORCH_CHECK(imp_loss.size() == n, "soft_mask: list lengths differ: imp_bias ", n, ", imp_loss ", imp_loss.size());
  const at::Tensor given = checked_bounds("soft_mask", bounds, n);
  // Importances are float32 accumulators; anything else (float64, half, a strided view) is read through a
  // contiguous float32 copy, which is what the reference's x.float() computes on too.
  std::vector<at::Tensor> ib(n), il(n), out(n);
  std::vector<const float*> pb(n), pl(n);
  std::vector<float*> po(n);
  std::vector<int64_t> sizes(n);
  for (size_t i = 0; i < n; ++i) {
    check_pair("soft_mask", i, imp_bias[i], imp_loss[i]);
    ib[i] = imp_bias[i].to(at::kFloat).contiguous();
    il[i] = imp_loss[i].to(at::kFloat).contiguous();
    sizes[i] = ib[i].numel();
    out[i] = new_output(ib[i].sizes(), sizes[i]);
    pb[i] = ib[i].const_data_ptr<float>();
    pl[i] = il[i].const_data_ptr<float>();
    po[i] = out[i].data_ptr<float>();
  }
  run_passes(pb, pl, po, sizes, static_cast<float>(eps), apply_tanh,
             given.defined() ? given.const_data_ptr<float>() : nullptr);
  return out;
}

// The bytes [first, last) a dense tensor's elements occupy.
std::pair<uintptr_t, uintptr_t> byte_range(const at::Tensor& t) {
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {first, first + static_cast<uintptr_t>(t.numel()) * t.element_size()};
}

// soft_mask_ writes imp_bias[i] while it reads every other tensor: no written tensor may share memory with any
// other tensor of either list, except imp_loss[i] being imp_bias[i] itself (element j is read before it is written).
void check_no_overlap(at::TensorList imp_bias, const std::vector<at::Tensor>& il) {
  struct Range {
    uintptr_t first, last;
    bool written;
    size_t index;
  };
  std::vector<Range> ranges;
  for (size_t i = 0; i < imp_bias.size(); ++i) {
    if (imp_bias[i].numel() == 0) continue;
    const auto [bf, bl] = byte_range(imp_bias[i]);
    ranges.push_back({bf, bl, true, i});
    const auto [lf, ll] = byte_range(il[i]);
    if (!(lf == bf && ll == bl)) ranges.push_back({lf, ll, false, i});
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.first < b.first; });
  const auto name = [](const Range& r) {
    return std::string(r.written ? "imp_bias[" : "imp_loss[") + std::to_string(r.index) + "]";
  };
  size_t widest = 0;  // among the ranges seen so far, the one reaching furthest
  for (size_t k = 1; k < ranges.size(); ++k) {
    const Range &a = ranges[widest], &b = ranges[k];
    TORCH_CHECK(!(b.first < a.last && (a.written || b.written)), "soft_mask_: ", name(a), " and ", name(b),
                " share memory; the mask is written into imp_bias, so give each importance its own tensor");
    if (b.last > a.last) widest = k;
  }
}

// In place: imp_bias[i] ← the mask of pair i. No new memory: the importances are usually dropped once the mask is
// built, and a fresh mask set costs a parameter-sized allocation (and its page faults) on top of the two importances.
void soft_mask_inplace_cpu(at::TensorList imp_bias, at::TensorList imp_loss, double eps, bool apply_tanh,
                           const std::optional<at::Tensor>& bounds) {
  const size_t n = imp_bias.size();
  TORCH_CHECK(imp_loss.size() == n, "soft_mask_: list lengths differ: imp_bias ", n, ", imp_loss ", imp_loss.size());
  const at::Tensor given = checked_bounds("soft_mask_", bounds, n);
  std::vector<at::Tensor> il(n);
  std::vector<const float*> pb(n), pl(n);
  std::vector<float*> po(n);
  std::vector<int64_t> sizes(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& b = imp_bias[i];
    check_pair("soft_mask_", i, b, imp_loss[i]);
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.is_non_overlapping_and_dense(), "soft_mask_: imp_bias[", i,
                "] (", describe(b), ") must be a dense float32 tensor to hold its mask in place");
    // imp_loss is read in imp_bias's element order: a float32 copy in that layout when it is not already one.
    const at::Tensor& l = imp_loss[i];
    il[i] = (l.scalar_type() == at::kFloat && same_dense_layout(b, l)) ? l : at::empty_like(b).copy_(l);
    sizes[i] = b.numel();
    po[i] = b.data_ptr<float>();
    pb[i] = po[i];
    pl[i] = il[i].const_data_ptr<float>();
  }
  check_no_overlap(imp_bias, il);
  run_passes(pb, pl, po, sizes, static_cast<float>(eps), apply_tanh,
             given.defined() ? given.const_data_ptr<float>() : nullptr);
}

}  // namespace
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CPU, m) {
  m.impl("soft_mask", &fastmask::soft_mask_cpu);
  m.impl("soft_mask_", &fastmask::soft_mask_inplace_cpu);
}
