// Torch glue of the CUDA ops radix_histogram and hard_mask (built only with FASTMASK_BUILD_CUDA=1). The kernels are
// in percentile_kernels.cu; the input checks and threshold keys are the CPU op's (csrc/radix.h), so both devices
// give the same answer. A radix_histogram pass is one launch over all tensors.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>

#include "../radix.h"

extern "C" {
int fastmask_radix_histogram_cuda(const void* const* ptrs, const int64_t* offsets, int64_t ntensors, int64_t total,
                                  int elem_bytes, int format, const uint64_t* prefixes, int nrows, int prefix_bits,
                                  int digit_bits, int check_nan, unsigned long long* out, int* nan_tensor,
                                  cudaStream_t stream);
int fastmask_hard_mask_cuda(const void* const* in, void* const* out, const int64_t* offsets, const int64_t* numels,
                            int64_t ntensors, int64_t total, int format, uint64_t key, int inclusive, int packed,
                            cudaStream_t stream);
}

namespace fastmask {
namespace radix {
namespace {

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, op, ": CUDA kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// A device array of int64 values (data pointers or offsets) for the kernels.
at::Tensor to_device(const std::vector<int64_t>& values, const at::Device& device) {
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

DeviceList device_list(const std::vector<at::Tensor>& ts) {
  std::vector<int64_t> ptrs, offsets{0};
  for (const auto& t : ts) {
    ptrs.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
    offsets.push_back(offsets.back() + t.numel());
  }
  const auto device = ts[0].device();
  return {to_device(ptrs, device), to_device(offsets, device), offsets.back()};
}

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

std::vector<at::Tensor> hard_mask_cuda(at::TensorList tensors, double threshold, bool inclusive,
                                       std::string_view layout) {
  const char* op = "fastmask.hard_mask";
  const auto ts = checked_contiguous(tensors, op);
  const c10::cuda::CUDAGuard guard(ts[0].device());
  const Layout lay = parse_layout(layout);
  const auto dtype = ts[0].scalar_type();
  const MaskThreshold th = mask_threshold(dtype, threshold, inclusive);
  const bool packed = lay == Layout::kPacked;
  std::vector<at::Tensor> out;
  std::vector<int64_t> in_ptrs, out_ptrs, offsets{0}, numels;
  for (const auto& t : ts) {
    out.push_back(empty_mask(t, lay));
    in_ptrs.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
    out_ptrs.push_back(reinterpret_cast<int64_t>(out.back().data_ptr()));
    offsets.push_back(offsets.back() + out.back().numel());  // elements, or bytes when packed
    numels.push_back(t.numel());
  }
  if (th.never) {
    for (auto& m : out) m.zero_();
    return out;
  }
  const auto device = ts[0].device();
  const at::Tensor d_in = to_device(in_ptrs, device), d_out = to_device(out_ptrs, device);
  const at::Tensor d_offsets = to_device(offsets, device), d_numels = to_device(numels, device);
  check_launch(fastmask_hard_mask_cuda(reinterpret_cast<const void* const*>(d_in.data_ptr<int64_t>()),
                                       reinterpret_cast<void* const*>(d_out.data_ptr<int64_t>()),
                                       d_offsets.data_ptr<int64_t>(), d_numels.data_ptr<int64_t>(),
                                       static_cast<int64_t>(ts.size()), offsets.back(),
                                       static_cast<int>(key_format(dtype)), th.key, inclusive, packed,
                                       at::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

}  // namespace
}  // namespace radix
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CUDA, m) {
  m.impl("radix_histogram", &fastmask::radix::radix_histogram_cuda);
  m.impl("hard_mask", &fastmask::radix::hard_mask_cuda);
}
