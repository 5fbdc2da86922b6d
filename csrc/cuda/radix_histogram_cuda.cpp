// Torch glue of the CUDA radix_histogram (built only with FASTMASK_BUILD_CUDA=1): one launch over all tensors of the
// kernel in radix_histogram_kernels.cu, with the CPU op's argument checks and NaN error (csrc/radix.h), so both
// devices give the same counts and errors.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <vector>

#include "../radix.h"
#include "device_list.h"

extern "C" {
int fastmask_radix_histogram_cuda(const void* const* ptrs, const int64_t* offsets, int64_t ntensors, int64_t total,
                                  int elem_bytes, int format, const uint64_t* prefixes, int nrows, int prefix_bits,
                                  int digit_bits, int check_nan, unsigned long long* out, int* nan_tensor,
                                  cudaStream_t stream);
}

namespace fastmask {
namespace radix {
namespace {

// One radix pass; returns the device counts (rows x 2^digit_bits int64). Raises, naming the tensor, on NaN in the
// first pass.
at::Tensor histogram_device(const std::vector<at::Tensor>& ts, const DeviceList& d,
                            const std::vector<uint64_t>& prefixes, int prefix_bits, int digit_bits, const char* op) {
  const auto dtype = ts[0].scalar_type();
  const auto device = ts[0].device();
  const int nrows = static_cast<int>(prefixes.size());
  at::Tensor out = at::zeros({nrows, int64_t{1} << digit_bits}, at::TensorOptions().dtype(at::kLong).device(device));
  at::Tensor nan = at::full({1}, INT_MAX, at::TensorOptions().dtype(at::kInt).device(device));
  const bool check_nan = prefix_bits == 0;  // every element is read in the first pass
  check_launch(fastmask_radix_histogram_cuda(
                   reinterpret_cast<const void* const*>(d.ptrs.data_ptr<int64_t>()), d.offsets.data_ptr<int64_t>(),
                   static_cast<int64_t>(ts.size()), d.total, static_cast<int>(c10::elementSize(dtype)),
                   static_cast<int>(key_format(dtype)), prefixes.data(), nrows, prefix_bits, digit_bits, check_nan,
                   reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()), nan.data_ptr<int>(),
                   at::cuda::getCurrentCUDAStream()),
               op);
  if (check_nan) {
    const int index = nan.item<int>();
    if (index != INT_MAX) raise_nan(index, ts[static_cast<size_t>(index)], op);
  }
  return out;
}

at::Tensor radix_histogram_cuda(at::TensorList tensors, at::IntArrayRef prefixes, int64_t prefix_bits,
                                int64_t digit_bits) {
  const char* op = "fastmask.radix_histogram";
  const auto ts = checked_contiguous(tensors, op);
  const c10::cuda::CUDAGuard guard(ts[0].device());
  const auto pre = checked_prefixes(key_bits(ts[0].scalar_type()), prefixes, prefix_bits, digit_bits, op);
  return histogram_device(ts, device_list(ts), pre, static_cast<int>(prefix_bits), static_cast<int>(digit_bits), op);
}

}  // namespace
}  // namespace radix
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CUDA, m) {
  m.impl("radix_histogram", &fastmask::radix::radix_histogram_cuda);
}
