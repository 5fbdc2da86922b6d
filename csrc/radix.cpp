// Definitions of csrc/radix.h: what the radix_histogram and hard_mask ops share on both devices.
#include "radix.h"

#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace fastmask {
namespace radix {
namespace {

// x rounded to float with round-to-odd: converting that float to a narrower format (fp16) with round-to-nearest then
// equals rounding x directly, as numpy's double -> half conversion does (no double rounding through float).
float to_float_round_odd(double x) {
  float f = static_cast<float>(x);
  if (std::isfinite(x) && static_cast<double>(f) != x) {
    if (std::fabs(static_cast<double>(f)) > std::fabs(x)) f = std::nextafter(f, 0.0f);
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    u |= 1u;
    std::memcpy(&f, &u, sizeof u);
  }
  return f;
}

c10::Half half_from_double(double x) { return c10::Half(to_float_round_odd(x)); }

}  // namespace

double round_threshold(at::ScalarType dtype, double threshold) {
  switch (dtype) {
    case at::kHalf:
      return static_cast<double>(static_cast<float>(half_from_double(threshold)));
    case at::kFloat:
    case at::kBFloat16:
      return static_cast<double>(static_cast<float>(threshold));
    default:
      return threshold;
  }
}

int key_bits(at::ScalarType dtype) { return static_cast<int>(c10::elementSize(dtype)) * 8; }

keys::Format key_format(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return keys::Format::kHalf;
    case at::kBFloat16:
      return keys::Format::kBFloat16;
    case at::kFloat:
      return keys::Format::kFloat;
    default:
      return keys::Format::kDouble;
  }
}

namespace {
const char* dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    default:
      return c10::toString(dtype);
  }
}
}  // namespace

std::string describe(int64_t index, const at::Tensor& t) {
  std::ostringstream s;
  s << "tensors[" << index << "] (shape " << t.sizes() << ", " << dtype_name(t.scalar_type()) << ")";
  return s.str();
}

void raise_nan(int64_t index, const at::Tensor& t, const char* op) {
  TORCH_CHECK_VALUE(false, op, ": ", describe(index, t),
                    " contains NaN; np.percentile would return nan and every hard mask would be empty. "
                    "Replace the NaNs (e.g. torch.nan_to_num) or find where they come from.");
}

std::vector<at::Tensor> checked_contiguous(at::TensorList tensors, const char* op) {
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": expected at least one tensor, got an empty list");
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  const at::Tensor& first = tensors[0];
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), op, ": tensors[", i, "] is undefined");
    const auto dt = t.scalar_type();
    const auto index = static_cast<int64_t>(i);
    TORCH_CHECK_TYPE(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble, op, ": ",
                     describe(index, t), " is not float16, bfloat16, float32 or float64");
    TORCH_CHECK_TYPE(dt == first.scalar_type(), op, ": ", describe(index, t), " differs in dtype from ",
                     describe(0, first), "; pass tensors of one dtype");
    TORCH_CHECK_VALUE(t.device() == first.device(), op, ": tensors[", i, "] is on ", t.device(),
                      " but tensors[0] is on ", first.device());
    // Parameters and importances are contiguous, so this copies nothing in practice.
    out.push_back(t.contiguous());
  }
  return out;
}

std::vector<uint64_t> checked_prefixes(int bits, at::IntArrayRef prefixes, int64_t prefix_bits, int64_t digit_bits,
                                       const char* op) {
  TORCH_CHECK_VALUE(digit_bits >= 1 && digit_bits <= 16, op, ": digit_bits must be in [1, 16], got ", digit_bits);
  TORCH_CHECK_VALUE(prefix_bits >= 0 && prefix_bits + digit_bits <= bits, op,
                    ": prefix_bits + digit_bits must be <= ", bits, " (the key width of this dtype), got ",
                    prefix_bits, " + ", digit_bits);
  TORCH_CHECK_VALUE(prefixes.size() == 1 || prefixes.size() == 2, op, ": expected 1 or 2 prefixes, got ",
                    prefixes.size());
  TORCH_CHECK_VALUE(prefix_bits > 0 || prefixes.size() == 1, op,
                    ": with prefix_bits=0 there is one histogram; pass prefixes=[0]");
  std::vector<uint64_t> out;
  for (const int64_t p : prefixes) {
    TORCH_CHECK_VALUE(p >= 0 && static_cast<uint64_t>(p) >> prefix_bits == 0, op, ": prefix ", p,
                      " does not fit in prefix_bits=", prefix_bits);
    out.push_back(static_cast<uint64_t>(p));
  }
  return out;
}

Layout parse_layout(std::string_view layout) {
  if (layout == "bool") return Layout::kBool;
  if (layout == "bits") return Layout::kBits;
  TORCH_CHECK_VALUE(false, "fastmask.hard_mask: layout must be 'bool' or 'bits', got '", std::string(layout), "'");
}

at::Tensor empty_mask(const at::Tensor& t, Layout layout) {
  const auto opts = t.options().memory_format(c10::nullopt);
  if (layout == Layout::kBool) return at::empty(t.sizes(), opts.dtype(at::kBool));
  return at::empty({(t.numel() + 7) / 8}, opts.dtype(at::kChar));
}

MaskThreshold mask_threshold(at::ScalarType dtype, double threshold, bool inclusive) {
  if (std::isnan(threshold)) return {0, 0, true};
  double t = round_threshold(dtype, threshold);
  // -0.0 == +0.0: for x > 0 neither zero passes (compare with +0.0's key), for x >= 0 both do (-0.0's key).
  if (t == 0.0) t = inclusive ? -0.0 : 0.0;
  switch (dtype) {
    case at::kHalf:
      return {keys::to_key(c10::Half(static_cast<float>(t)).x), 16, false};
    case at::kFloat:
    case at::kBFloat16: {
      const float f = static_cast<float>(t);
      uint32_t bits;
      std::memcpy(&bits, &f, sizeof bits);
      return {keys::to_key(bits), 32, false};
    }
    default: {
      uint64_t bits;
      std::memcpy(&bits, &t, sizeof bits);
      return {keys::to_key(bits), 64, false};
    }
  }
}

}  // namespace radix
}  // namespace fastmask
