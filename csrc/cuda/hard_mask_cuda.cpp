// Torch glue of the CUDA hard_mask (built only with FASTMASK_BUILD_CUDA=1): every tensor's mask in one launch of the
// kernel in hard_mask_kernels.cu, with the CPU op's checks, layouts and threshold key (csrc/radix.h), so both devices
// give the same masks.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <string_view>
#include <vector>

#include "../radix.h"
#include "device_list.h"

extern "C" {
int fastmask_hard_mask_cuda(const void* const* in, void* const* out, const int64_t* offsets, const int64_t* numels,
                            int64_t ntensors, int64_t total, int format, uint64_t key, int inclusive, int packed,
                            cudaStream_t stream);
}

namespace fastmask {
namespace radix {
namespace {

std::vector<at::Tensor> hard_mask_cuda(at::TensorList tensors, double threshold, bool inclusive,
                                       std::string_view layout) {
  const char* op = "fastmask.hard_mask";
  const auto ts = checked_contiguous(tensors, op);
  const c10::cuda::CUDAGuard guard(ts[0].device());
  const Layout lay = parse_layout(layout);
  const auto dtype = ts[0].scalar_type();
  const MaskThreshold th = mask_threshold(dtype, threshold, inclusive);
  const bool packed = lay == Layout::kBits;
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
  m.impl("hard_mask", &fastmask::radix::hard_mask_cuda);
}
