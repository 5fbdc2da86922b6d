// Order-preserving unsigned keys for IEEE floats: the percentile's radix selection (one radix_histogram pass at a
// time, driven by fastmask/ops/radix.py) works on these keys instead of the values, so one pass is a plain integer
// histogram over the bit patterns; hard_mask compares them against the threshold's key.
//
// key(x) = bits(x) | sign_bit   when x's sign bit is clear,
//          ~bits(x)             when it is set.
// For any two non-NaN floats, x < y  =>  key(x) < key(y); -0.0 gets the key just below +0.0 (a total order, like
// std::sort with a sign-aware tie-break), and NaNs fall outside [key(-inf), key(+inf)]. The map is a bijection, so the
// selected key decodes back to the exact value.
//
// Torch-free on purpose: the CPU kernels (csrc/radix_histogram.cpp, csrc/hard_mask.cpp, through csrc/radix.h) and the
// pure-CUDA kernels (csrc/cuda/radix_histogram_kernels.cu, csrc/cuda/hard_mask_kernels.cu, compiled by plain nvcc)
// all include it.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTMASK_HD __host__ __device__ __forceinline__
#else
#define FASTMASK_HD inline
#endif

namespace fastmask {
namespace keys {

template <typename U>
FASTMASK_HD U sign_bit() {
  return static_cast<U>(U(1) << (sizeof(U) * 8 - 1));
}

template <typename U>
FASTMASK_HD U to_key(U bits) {
  // Branch-free so the loops that call it vectorise: mask is all ones for negative values, else just the sign bit.
  const U neg = static_cast<U>(U(0) - (bits >> (sizeof(U) * 8 - 1)));
  return static_cast<U>(bits ^ (neg | sign_bit<U>()));
}

template <typename U>
FASTMASK_HD U from_key(U key) {
  const U pos = static_cast<U>(key >> (sizeof(U) * 8 - 1));  // 1 when the value was non-negative
  const U mask = static_cast<U>(U(0) - (U(1) - pos));          // all ones for negative values
  return static_cast<U>(key ^ (mask | sign_bit<U>()));
}

// |x| bit patterns above inf_bits are NaN. fp16: exponent 5 bits; bf16: 8; fp32: 8; fp64: 11.
enum class Format : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

FASTMASK_HD uint64_t inf_bits(Format f) {
  switch (f) {
    case Format::kHalf:
      return 0x7C00u;
    case Format::kBFloat16:
      return 0x7F80u;
    case Format::kFloat:
      return 0x7F800000u;
    default:
      return 0x7FF0000000000000ull;
  }
}

template <typename U>
FASTMASK_HD bool is_nan_bits(U bits, U inf) {
  return static_cast<U>(bits & static_cast<U>(~sign_bit<U>())) > inf;
}

}  // namespace keys
}  // namespace fastmask
