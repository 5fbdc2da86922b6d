// Torch glue shared by the CUDA ops (csrc/cuda/<op>_cuda.cpp): a tensor list as the device arrays its kernels
// (csrc/cuda/<op>_kernels.cu, walking them as csrc/cuda/device_list.cuh describes) take, and the launch check.
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastmask {

// Raises, naming the op, when a launcher returned a CUDA error (its cudaError_t as an int).
inline void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, op, ": CUDA kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// A device array of int64 values (data pointers or offsets) for the kernels.
inline at::Tensor to_device(const std::vector<int64_t>& values, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(values.begin(), values.end(), host.data_ptr<int64_t>());
  return host.to(device);
}

// The tensors as one virtual concatenation on the device: data pointers and element offsets (T + 1).
struct DeviceList {
  at::Tensor ptrs;
  at::Tensor offsets;
  int64_t total;
};

inline DeviceList device_list(const std::vector<at::Tensor>& ts) {
  std::vector<int64_t> ptrs, offsets{0};
  for (const auto& t : ts) {
    ptrs.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
    offsets.push_back(offsets.back() + t.numel());
  }
  const auto device = ts[0].device();
  return {to_device(ptrs, device), to_device(offsets, device), offsets.back()};
}

}  // namespace fastmask
