// What the CPU (csrc/percentile.cpp) and CUDA (csrc/cuda/percentile_cuda.cpp) percentile / hard-mask ops share:
// numpy's rank plan and interpolation formula, threshold rounding, input checks, and the radix-select driver. The
// devices differ only in how one histogram pass over the keys (csrc/order_keys.h) is computed.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "order_keys.h"

namespace fastmask {
namespace percentile {

enum class Method { kLinear, kLower, kHigher, kNearest, kMidpoint };
Method parse_method(std::string_view method);

// np.percentile(a, q, method) on n sorted values is  lerp(sorted[lo], sorted[hi], gamma)  (interpolate) or
// sorted[lo] (lower / higher / nearest), with lo, hi and gamma computed by numpy's own float64 formulas.
struct Plan {
  int64_t lo;
  int64_t hi;
  double gamma;
  bool interpolate;
};
Plan make_plan(int64_t n, double q, Method method);

// numpy's _lerp(a, b, gamma) evaluated in the precision numpy uses for this dtype (q a Python float, NEP 50):
// float16 for Half, float32 for Float and for BFloat16 (numpy sees bf16 through its exact float32 upcast), float64
// for Double. a and b are exact values of the dtype.
double lerp_like_numpy(at::ScalarType dtype, double a, double b, double gamma);

// The threshold as numpy compares it against an array of this dtype: rounded to nearest into float16 (Half),
// float32 (Float, BFloat16 through its float32 upcast) or kept (Double).
double round_threshold(at::ScalarType dtype, double threshold);

// Width of this dtype's keys (its storage bits), and that width split into digits of at most max_digit bits, most
// significant first: the passes of radix_select.
int key_bits(at::ScalarType dtype);
std::vector<int> split_digits(int key_bits, int max_digit);
keys::Format key_format(at::ScalarType dtype);
double decode_key(at::ScalarType dtype, uint64_t key);

// Validates a tensor list (non-empty, one floating dtype, one device) and returns the tensors made contiguous.
std::vector<at::Tensor> checked_contiguous(at::TensorList tensors, const char* op);
// radix_histogram's arguments checked against the key width (digit_bits in [1, 16], prefixes that fit).
std::vector<uint64_t> checked_prefixes(int key_bits, at::IntArrayRef prefixes, int64_t prefix_bits,
                                       int64_t digit_bits, const char* op);
// "tensors[3] (shape [64, 3, 7, 7], float32)"
std::string describe(int64_t index, const at::Tensor& t);
[[noreturn]] void raise_nan(int64_t index, const at::Tensor& t, const char* op);

enum class Layout { kBool, kUInt8, kPacked };
Layout parse_layout(std::string_view layout);
// Output tensor for one input: bool / uint8 of the input's shape, or ceil(numel / 8) packed bytes.
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

// Radix selection of the keys at ranks `ranks` (ranks[1] - ranks[0] in {0, 1}) among all elements, most
// significant digit first. `hist(prefixes, prefix_bits, digit_bits)` returns prefixes.size() rows of 2^digit_bits
// counts: row p counts the elements whose top prefix_bits key bits equal prefixes[p], binned by their next digit.
// Each target keeps its own prefix, so two order statistics that part ways are still refined in one pass each level.
template <typename HistFn>
std::array<uint64_t, 2> radix_select(const std::vector<int>& digits, std::array<int64_t, 2> ranks, HistFn&& hist) {
  std::array<uint64_t, 2> prefix{0, 0};
  int prefix_bits = 0;
  for (const int d : digits) {
    std::vector<uint64_t> rows{prefix[0]};
    if (prefix[1] != prefix[0]) rows.push_back(prefix[1]);
    const std::vector<int64_t> h = hist(rows, prefix_bits, d);
    const int64_t nbins = int64_t{1} << d;
    for (int t = 0; t < 2; ++t) {
      const int64_t* row = h.data() + (prefix[t] == rows[0] ? 0 : nbins);
      int64_t bin = 0;
      while (bin < nbins && row[bin] <= ranks[t]) ranks[t] -= row[bin++];
      // Only reachable if the data changed between passes: the first pass counted every element.
      TORCH_CHECK(bin < nbins, "fastmask.percentile: the input changed while it was being read");
      prefix[t] = (prefix[t] << d) | static_cast<uint64_t>(bin);
    }
    prefix_bits += d;
  }
  return prefix;
}

}  // namespace percentile
}  // namespace fastmask
