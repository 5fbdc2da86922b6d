// CUDA kernel of fastmask::hard_mask: pure CUDA with an extern "C" host launcher (no torch headers), so CI compiles
// this file with plain nvcc. The torch glue is csrc/cuda/hard_mask_cuda.cpp; the threshold's order key is the CPU
// op's (csrc/radix.h: radix::mask_threshold), so both devices compare alike.
#include <cuda_runtime.h>

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

// x > t (x >= t when inclusive) as an order-key comparison on the bits widened to the comparison width C (bf16 is
// compared through its exact float32 upcast); NaN never passes.
template <typename S, typename C, int kWiden>
__device__ __forceinline__ uint8_t passes(S bits, C key, C inf, bool inclusive) {
  const C w = static_cast<C>(static_cast<C>(bits) << kWiden);
  const C k = to_key(w);
  return static_cast<uint8_t>((inclusive ? k >= key : k > key) && !is_nan_bits(w, inf));
}

// Layout "bool": one thread per element. "bits": one thread per output byte, offsets counted in bytes per tensor.
template <typename S, typename C, int kWiden>
__global__ void hard_mask_kernel(const void* const* __restrict__ in, void* const* __restrict__ out,
                                 const int64_t* __restrict__ offsets, const int64_t* __restrict__ numels,
                                 int64_t ntensors, int64_t total, C key, C inf, bool inclusive, bool packed) {
  int64_t begin, end;
  block_range(total, &begin, &end);
  if (begin >= end) return;
  int64_t t = tensor_of(offsets, ntensors, begin);
  for (int64_t g = begin + threadIdx.x; g < end; g += blockDim.x) {
    while (__ldg(offsets + t + 1) <= g) ++t;
    const int64_t i = g - __ldg(offsets + t);
    const S* x = static_cast<const S*>(in[t]);
    uint8_t* m = static_cast<uint8_t*>(out[t]);
    if (!packed) {
      m[i] = passes<S, C, kWiden>(x[i], key, inf, inclusive);
      continue;
    }
    const int64_t n = __ldg(numels + t);
    uint8_t byte = 0;  // elements 8i .. 8i+7 in bits 0..7 (np.packbits bitorder="little"); unused bits stay 0
    for (int b = 0; b < 8 && 8 * i + b < n; ++b)
      byte |= static_cast<uint8_t>(passes<S, C, kWiden>(x[8 * i + b], key, inf, inclusive) << b);
    m[i] = byte;
  }
}

}  // namespace

extern "C" {

// Hard masks for every tensor in one launch. offsets / total count elements (layout "bool") or output bytes
// ("bits", ceil(numel / 8) per tensor); numels are the tensors' element counts. key is the order key of the
// threshold at the comparison width (fastmask::radix::mask_threshold). Returns a cudaError_t.
int fastmask_hard_mask_cuda(const void* const* in, void* const* out, const int64_t* offsets, const int64_t* numels,
                            int64_t ntensors, int64_t total, int format, uint64_t key, int inclusive, int packed,
                            cudaStream_t stream) {
  if (total == 0) return cudaSuccess;
  const int grid = grid_for(total);
  const auto fmt = static_cast<Format>(format);
  const bool inc = inclusive != 0, pk = packed != 0;
  switch (fmt) {
    case Format::kHalf:
      hard_mask_kernel<uint16_t, uint16_t, 0><<<grid, kThreads, 0, stream>>>(
          in, out, offsets, numels, ntensors, total, static_cast<uint16_t>(key),
          static_cast<uint16_t>(inf_bits(Format::kHalf)), inc, pk);
      break;
    case Format::kBFloat16:
      hard_mask_kernel<uint16_t, uint32_t, 16><<<grid, kThreads, 0, stream>>>(
          in, out, offsets, numels, ntensors, total, static_cast<uint32_t>(key),
          static_cast<uint32_t>(inf_bits(Format::kFloat)), inc, pk);
      break;
    case Format::kFloat:
      hard_mask_kernel<uint32_t, uint32_t, 0><<<grid, kThreads, 0, stream>>>(
          in, out, offsets, numels, ntensors, total, static_cast<uint32_t>(key),
          static_cast<uint32_t>(inf_bits(Format::kFloat)), inc, pk);
      break;
    default:
      hard_mask_kernel<uint64_t, uint64_t, 0><<<grid, kThreads, 0, stream>>>(
          in, out, offsets, numels, ntensors, total, key, inf_bits(Format::kDouble), inc, pk);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
