// Helpers for CPU kernels that make one element-wise pass over a list of tensors.
//
// The tensors are laid end to end as one virtual array of `offsets.back()` elements, cut into equal chunks that the
// OpenMP threads share out, so 161 small tensors and one huge tensor keep every core equally busy, and a chunk
// touches only a few tensors, in order (good for the prefetchers).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace fastmask {

// Below this many elements per thread the fork/join costs more than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 15;
// Threads take chunks of the virtual array dynamically: a thread that the OS preempts (a busy machine, CI) holds up
// one chunk, not half of the work. 64K elements (256 KB per float32 stream) keep the per-chunk cost negligible and
// the hardware prefetchers streaming. A multiple of 16, so chunks of float32 data start on 64-byte boundaries.
constexpr int64_t kChunk = 1 << 16;

// offsets[i] is where tensor i starts in the virtual array; offsets.back() is the total.
inline std::vector<int64_t> prefix_offsets(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> offsets(sizes.size() + 1, 0);
  for (size_t i = 0; i < sizes.size(); ++i) offsets[i + 1] = offsets[i] + sizes[i];
  return offsets;
}

// How many threads a pass over `total` elements should use.
inline int threads_for(int64_t total) {
  const int64_t wanted = std::max<int64_t>(1, total / kMinElementsPerThread);
  return static_cast<int>(std::min<int64_t>(wanted, at::get_num_threads()));
}

// Number of chunks of [begin, end), and chunk c of it.
inline int64_t chunk_count(int64_t begin, int64_t end) { return (end - begin + kChunk - 1) / kChunk; }
inline std::pair<int64_t, int64_t> chunk(int64_t begin, int64_t end, int64_t c) {
  return {begin + c * kChunk, std::min(end, begin + (c + 1) * kChunk)};
}

// Calls f(i, b, e) for every tensor i that overlaps [lo, hi) of the virtual array, with [b, e) the overlap in
// tensor i's own element indices. Empty tensors are never visited.
template <class F>
void for_each_piece(const std::vector<int64_t>& offsets, int64_t lo, int64_t hi, F&& f) {
  if (lo >= hi) return;
  size_t i = std::upper_bound(offsets.begin(), offsets.end(), lo) - offsets.begin() - 1;
  for (; i + 1 < offsets.size() && offsets[i] < hi; ++i) {
    const int64_t b = std::max(lo, offsets[i]) - offsets[i];
    const int64_t e = std::min(hi, offsets[i + 1]) - offsets[i];
    if (e > b) f(i, b, e);
  }
}

// True when a and b (same shape) are both dense and lay their elements out in the same order, so one flat index
// walks both; strides of size-1 dimensions do not matter.
inline bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  if (!a.is_non_overlapping_and_dense() || !b.is_non_overlapping_and_dense()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// "shape [2, 3], strides [3, 1], dtype Float, device cpu" — for error messages that name the tensor at fault.
inline std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << "shape " << t.sizes() << ", strides " << t.strides() << ", dtype " << t.scalar_type() << ", device "
    << t.device();
  return s.str();
}

}  // namespace fastmask

// Element loops are compiled for the x86-64 baseline, for AVX2 + FMA + F16C and (compute-heavy ones) for AVX-512, and
// picked at run time. C++ lets GCC contract a * b + c into an FMA where the target has one: a kernel whose results
// must round like the reference's separate torch ops turns that off with #pragma GCC optimize("fp-contract=off").
#if defined(__x86_64__) && defined(__GNUC__)
#define FASTMASK_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FASTMASK_HAS_AVX2() \
  (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
#define FASTMASK_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,f16c")))
#define FASTMASK_HAS_AVX512()                                                                  \
  (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&                 \
   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") && FASTMASK_HAS_AVX2())
#else
#define FASTMASK_AVX2
#define FASTMASK_HAS_AVX2() false
#define FASTMASK_AVX512
#define FASTMASK_HAS_AVX512() false
#endif
