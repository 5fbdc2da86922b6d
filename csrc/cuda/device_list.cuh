// How the CUDA kernels (csrc/cuda/<op>_kernels.cu) walk a tensor list. The tensors are one virtual concatenation: a
// device array of data pointers plus offsets (T + 1), built by the torch glue (csrc/cuda/device_list.h). Each block
// walks a contiguous range of global indices and tracks the tensor it is in, so a pass reads every tensor once,
// coalesced, with one launch for the whole list. Pure CUDA, no torch headers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastmask {

constexpr int kThreads = 256;  // per block, in every kernel

// The tensor that global index g falls in.
__device__ __forceinline__ int64_t tensor_of(const int64_t* __restrict__ offsets, int64_t ntensors, int64_t g) {
  int64_t lo = 0, hi = ntensors;  // last t with offsets[t] <= g
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (__ldg(offsets + mid) <= g) lo = mid; else hi = mid;
  }
  return lo;
}

// This block's range [begin, end) of the total global indices.
__device__ __forceinline__ void block_range(int64_t total, int64_t* begin, int64_t* end) {
  const int64_t per = (total + gridDim.x - 1) / gridDim.x;
  *begin = per * blockIdx.x;
  *end = *begin + per < total ? *begin + per : total;
}

// Blocks for a pass over `total` indices: at least 8 per thread, at most 8 blocks per SM.
inline int grid_for(int64_t total) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t wanted = (total + kThreads * 8 - 1) / (kThreads * 8);  // >= 8 elements per thread
  const int64_t cap = static_cast<int64_t>(sms) * 8;
  return static_cast<int>(wanted < 1 ? 1 : (wanted < cap ? wanted : cap));
}

}  // namespace fastmask
