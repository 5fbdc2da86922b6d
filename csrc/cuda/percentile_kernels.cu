// CUDA kernels of fastmask::radix_histogram / hard_mask: pure CUDA with extern "C" host launchers (no torch
// headers), so CI compiles this file with plain nvcc. The torch glue is csrc/cuda/percentile_cuda.cpp.
//
// The input tensors are one virtual concatenation: a device array of data pointers plus element offsets (T + 1).
// Each block walks a contiguous range of global element indices and tracks the tensor it is in, so a pass reads
// every tensor once, coalesced, with one launch for the whole list.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../order_keys.h"

namespace {

using fastmask::keys::Format;
using fastmask::keys::inf_bits;
using fastmask::keys::is_nan_bits;
using fastmask::keys::to_key;

constexpr int kThreads = 256;
constexpr int kSharedDigitBits = 11;  // 2^11 bins x 2 rows x 4 B = 16 KiB of shared memory per block

__device__ __forceinline__ int64_t tensor_of(const int64_t* __restrict__ offsets, int64_t ntensors, int64_t g) {
  int64_t lo = 0, hi = ntensors;  // last t with offsets[t] <= g
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (__ldg(offsets + mid) <= g) lo = mid; else hi = mid;
  }
  return lo;
}

__device__ __forceinline__ void block_range(int64_t total, int64_t* begin, int64_t* end) {
  const int64_t per = (total + gridDim.x - 1) / gridDim.x;
  *begin = per * blockIdx.x;
  *end = *begin + per < total ? *begin + per : total;
}

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

// x > t (x >= t when inclusive) as an order-key comparison on the bits widened to the comparison width C (bf16 is
// compared through its exact float32 upcast); NaN never passes.
template <typename S, typename C, int kWiden>
__device__ __forceinline__ uint8_t passes(S bits, C key, C inf, bool inclusive) {
  const C w = static_cast<C>(static_cast<C>(bits) << kWiden);
  const C k = to_key(w);
  return static_cast<uint8_t>((inclusive ? k >= key : k > key) && !is_nan_bits(w, inf));
}

// Byte layouts: one thread per element. Packed: one thread per output byte, offsets counted in bytes per tensor.
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

int grid_for(int64_t total) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t wanted = (total + kThreads * 8 - 1) / (kThreads * 8);  // >= 8 elements per thread
  const int64_t cap = static_cast<int64_t>(sms) * 8;
  return static_cast<int>(wanted < 1 ? 1 : (wanted < cap ? wanted : cap));
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

// Hard masks for every tensor in one launch. offsets / total count elements (byte layouts) or output bytes
// (packed, ceil(numel / 8) per tensor); numels are the tensors' element counts. key is the order key of the
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
