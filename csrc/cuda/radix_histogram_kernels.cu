// CUDA kernel of fastmask::radix_histogram: pure CUDA with an extern "C" host launcher (no torch headers), so CI
// compiles this file with plain nvcc. The torch glue is csrc/cuda/radix_histogram_cuda.cpp; the pass counts what the
// CPU kernel (csrc/radix_histogram.cpp) counts, for the selection driven by fastmask/ops/radix.py, which takes
// kSharedDigitBits key bits per pass on the GPU.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../order_keys.h"
#include "device_list.cuh"

namespace {

using fastmask::block_range;
using fastmask::grid_for;
using fastmask::kThreads;
using fastmask::tensor_of;
using fastmask::keys::Format;
using fastmask::keys::inf_bits;
using fastmask::keys::is_nan_bits;
using fastmask::keys::to_key;

constexpr int kSharedDigitBits = 11;  // 2^11 bins x 2 rows x 4 B = 16 KiB of shared memory per block

// One radix pass: counts, per row r, the keys whose top prefix_bits equal prefix[r], binned by the next digit_bits.
// Rows live in shared memory when they fit (digit_bits <= 11), else counts go straight to global memory.
template <typename U>
__global__ void radix_histogram_kernel(const void* const* __restrict__ ptrs, const int64_t* __restrict__ offsets,
                                       int64_t ntensors, int64_t total, U pre0, U pre1, int nrows, int prefix_bits,
                                       int digit_bits, U inf, bool check_nan, unsigned long long* __restrict__ out,
                                       int* __restrict__ nan_tensor) {
  extern __shared__ unsigned int shared[];
  constexpr int W = sizeof(U) * 8;
  const int64_t nbins = int64_t{1} << digit_bits;
  const bool in_shared = digit_bits <= kSharedDigitBits;
  if (in_shared)
    for (int64_t i = threadIdx.x; i < nrows * nbins; i += blockDim.x) shared[i] = 0;
  __syncthreads();

  const int dshift = W - prefix_bits - digit_bits;
  const int pshift = prefix_bits == 0 ? 0 : W - prefix_bits;
  const U dmask = static_cast<U>(nbins - 1);
  int64_t begin, end;
  block_range(total, &begin, &end);
  int my_nan = INT_MAX;
  if (begin < end) {
    int64_t t = tensor_of(offsets, ntensors, begin);
    for (int64_t g = begin + threadIdx.x; g < end; g += blockDim.x) {
      while (__ldg(offsets + t + 1) <= g) ++t;
      const U bits = static_cast<const U*>(ptrs[t])[g - __ldg(offsets + t)];
      if (check_nan && is_nan_bits(bits, inf) && t < my_nan) my_nan = static_cast<int>(t);
      const U key = to_key(bits);
      int64_t row = -1;
      if (prefix_bits == 0) {
        row = 0;
      } else {
        const U top = static_cast<U>(key >> pshift);
        row = top == pre0 ? 0 : (nrows > 1 && top == pre1 ? 1 : -1);
      }
      if (row < 0) continue;
      const int64_t bin = row * nbins + static_cast<int64_t>((key >> dshift) & dmask);
      if (in_shared)
        atomicAdd(shared + bin, 1u);
      else
        atomicAdd(out + bin, 1ull);
    }
  }
  if (my_nan != INT_MAX) atomicMin(nan_tensor, my_nan);
  __syncthreads();
  if (in_shared)
    for (int64_t i = threadIdx.x; i < nrows * nbins; i += blockDim.x)
      if (shared[i] != 0) atomicAdd(out + i, static_cast<unsigned long long>(shared[i]));
}

}  // namespace

extern "C" {

// One radix pass over the tensors (see radix_histogram_kernel). out: nrows x 2^digit_bits counts, zeroed by the
// caller and accumulated into; nan_tensor: INT_MAX on entry, the lowest index of a tensor holding NaN on exit when
// check_nan. elem_bytes is 2, 4 or 8; format is a fastmask::keys::Format. Returns a cudaError_t.
int fastmask_radix_histogram_cuda(const void* const* ptrs, const int64_t* offsets, int64_t ntensors, int64_t total,
                                  int elem_bytes, int format, const uint64_t* prefixes, int nrows, int prefix_bits,
                                  int digit_bits, int check_nan, unsigned long long* out, int* nan_tensor,
                                  cudaStream_t stream) {
  if (total == 0) return cudaSuccess;
  const int grid = grid_for(total);
  const size_t shared = digit_bits <= kSharedDigitBits ? sizeof(unsigned int) * nrows * (size_t{1} << digit_bits) : 0;
  const uint64_t inf = inf_bits(static_cast<Format>(format));
  const uint64_t p1 = nrows > 1 ? prefixes[1] : prefixes[0];
  switch (elem_bytes) {
    case 2:
      radix_histogram_kernel<uint16_t><<<grid, kThreads, shared, stream>>>(
          ptrs, offsets, ntensors, total, static_cast<uint16_t>(prefixes[0]), static_cast<uint16_t>(p1), nrows,
          prefix_bits, digit_bits, static_cast<uint16_t>(inf), check_nan != 0, out, nan_tensor);
      break;
    case 4:
      radix_histogram_kernel<uint32_t><<<grid, kThreads, shared, stream>>>(
          ptrs, offsets, ntensors, total, static_cast<uint32_t>(prefixes[0]), static_cast<uint32_t>(p1), nrows,
          prefix_bits, digit_bits, static_cast<uint32_t>(inf), check_nan != 0, out, nan_tensor);
      break;
    default:
      radix_histogram_kernel<uint64_t><<<grid, kThreads, shared, stream>>>(
          ptrs, offsets, ntensors, total, prefixes[0], p1, nrows, prefix_bits, digit_bits, inf, check_nan != 0, out,
          nan_tensor);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
