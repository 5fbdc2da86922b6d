// What radix_histogram and hard_mask share, on both devices (CPU kernels in csrc/radix_histogram.cpp and
// csrc/hard_mask.cpp, CUDA glue in csrc/cuda/radix_histogram_cuda.cpp and csrc/cuda/hard_mask_cuda.cpp): input checks
// and the error messages that name a tensor, key widths and formats of the order keys (csrc/order_keys.h), threshold
// rounding, mask layouts and the threshold's key. The devices differ only in how a pass over the keys is computed.
// Definitions in csrc/radix.cpp.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "order_keys.h"

namespace fastmask {
namespace radix {

// The threshold as numpy compares it against an array of this dtype: rounded to nearest into float16 (Half),
// float32 (Float, BFloat16 through its float32 upcast) or kept (Double).
double round_threshold(at::ScalarType dtype, double threshold);

// Width of this dtype's keys (its storage bits).
int key_bits(at::ScalarType dtype);
keys::Format key_format(at::ScalarType dtype);

// Validates a tensor list (non-empty, one floating dtype, one device) and returns the tensors made contiguous.
std::vector<at::Tensor> checked_contiguous(at::TensorList tensors, const char* op);
// radix_histogram's arguments checked against the key width (digit_bits in [1, 16], prefixes that fit).
std::vector<uint64_t> checked_prefixes(int key_bits, at::IntArrayRef prefixes, int64_t prefix_bits,
                                       int64_t digit_bits, const char* op);
// "tensors[3] (shape [64, 3, 7, 7], float32)"
std::string describe(int64_t index, const at::Tensor& t);
[[noreturn]] void raise_nan(int64_t index, const at::Tensor& t, const char* op);

// hard_mask's output layouts: "bool" (one byte per element, the input's shape) or "bits" (ceil(numel / 8) int8 bytes
// of packed bits; int8, not uint8, which the masked optimizers read as a quantised soft mask m / 255).
enum class Layout { kBool, kBits };
Layout parse_layout(std::string_view layout);
// Output tensor for one input: bool of the input's shape, or ceil(numel / 8) int8 bytes of packed bits.
at::Tensor empty_mask(const at::Tensor& t, Layout layout);
// The comparison  x > t  (x >= t when inclusive)  as an order-key comparison on the storage bits, valid for every
// non-NaN x: key(x) > key_threshold (strict) or key(x) >= key_threshold (inclusive), keys over `cmp_bits`-wide
// patterns (bf16 data is widened to fp32 patterns before keying).
struct MaskThreshold {
  uint64_t key;
  int cmp_bits;
  bool never;  // NaN threshold: every comparison is false, as in numpy
};
MaskThreshold mask_threshold(at::ScalarType dtype, double threshold, bool inclusive);

}  // namespace radix
}  // namespace fastmask
