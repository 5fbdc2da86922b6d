// CPU kernels of fastmask::radix_histogram and fastmask::hard_mask (schemas in csrc/ops.cpp). radix_histogram is one
// pass of the percentile's radix selection (driver: fastmask/ops/radix.py) over order-preserving keys of the float
// bit patterns (csrc/order_keys.h): it streams every tensor once and builds a histogram of the next digit_bits key
// bits of the elements that share a prefix; memory is one histogram per thread, whatever n.
#include "percentile.h"

#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <type_traits>

#include "multi_tensor.h"

namespace fastmask {
namespace percentile {

// ---------------------------------------------------------------------------------------------------------------
// Shared with the CUDA glue (declared in percentile.h).

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
  if (layout == "uint8") return Layout::kUInt8;
  if (layout == "packed") return Layout::kPacked;
  TORCH_CHECK_VALUE(false, "fastmask.hard_mask: layout must be 'bool', 'uint8' or 'packed', got '",
                    std::string(layout), "'");
}

at::Tensor empty_mask(const at::Tensor& t, Layout layout) {
  const auto opts = t.options().memory_format(c10::nullopt);
  switch (layout) {
    case Layout::kBool:
      return at::empty(t.sizes(), opts.dtype(at::kBool));
    case Layout::kUInt8:
      return at::empty(t.sizes(), opts.dtype(at::kByte));
    default:
      return at::empty({(t.numel() + 7) / 8}, opts.dtype(at::kByte));
  }
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

// ---------------------------------------------------------------------------------------------------------------
// CPU kernels. The tensors are one virtual array (csrc/multi_tensor.h): chunks of kChunk elements, shared out
// dynamically among the OpenMP threads, each visiting the pieces of the tensors it overlaps, in order.

namespace {

constexpr int kBlock = 256;  // keys computed (vectorised) before they are counted; a multiple of 8
// The first pass counts every element. Runs of equal keys (duplicates, constant tensors) would serialise on one
// counter's load-increment-store, so even and odd elements go to two copies of the histogram, summed at the flush.
constexpr int64_t kFirstPassCopies = 2;

// The inputs as one virtual array: data pointers and prefix offsets, O(number of tensors) memory.
struct Inputs {
  std::vector<const void*> ptr;
  std::vector<int64_t> offsets;
};

Inputs inputs_of(const std::vector<at::Tensor>& ts) {
  Inputs in;
  std::vector<int64_t> sizes;
  for (const auto& t : ts) {
    in.ptr.push_back(t.data_ptr());
    sizes.push_back(t.numel());
  }
  in.offsets = prefix_offsets(sizes);
  return in;
}

// One radix pass's constants: bin = (key >> dshift) & dmask, for the keys whose top bits
// (key >> pshift) equal pre0 (row 0) or pre1 (row 1); every key in the first pass.
template <typename U>
struct Pass {
  int pshift, dshift;
  U dmask, pre0, pre1;
  int64_t nbins;
};

// Adds a block of n <= kBlock elements into the per-thread histogram `h` (rows of nbins uint32 counts). First pass
// (kAll): every key's top digit, into kFirstPassCopies copies of the one row. Later passes: only the keys in the
// rows' prefixes; those are rare, so a vectorised match test picks out the 8-key groups that hold any.
template <typename U, bool kAll>
__attribute__((always_inline)) inline void count_block(const U* __restrict p, int n, uint32_t* __restrict h,
                                                       const Pass<U>& ps) {
  U k[kBlock];
  for (int j = 0; j < n; ++j) k[j] = keys::to_key(p[j]);
  if constexpr (kAll) {
    static_assert(kFirstPassCopies == 2, "the loop below interleaves two copies");
    int j = 0;
    for (; j + 2 <= n; j += 2) {
      ++h[k[j] >> ps.dshift];
      ++h[ps.nbins + (k[j + 1] >> ps.dshift)];
    }
    if (j < n) ++h[k[j] >> ps.dshift];
  } else if constexpr (sizeof(U) == 8) {  // baseline x86-64 (SSE2) has no 64-bit lane compare: plain branches
    for (int j = 0; j < n; ++j) {
      const U top = static_cast<U>(k[j] >> ps.pshift);
      if (top == ps.pre0)
        ++h[(k[j] >> ps.dshift) & ps.dmask];
      else if (top == ps.pre1)
        ++h[ps.nbins + ((k[j] >> ps.dshift) & ps.dmask)];
    }
  } else {
    uint8_t match[kBlock];
    for (int j = 0; j < n; ++j) {
      const U top = static_cast<U>(k[j] >> ps.pshift);
      match[j] = static_cast<uint8_t>((top == ps.pre0) | (top == ps.pre1));
    }
    std::fill(match + n, match + ((n + 7) & ~7), uint8_t{0});
    for (int g = 0; g < n; g += 8) {
      uint64_t any;
      std::memcpy(&any, match + g, sizeof any);
      if (any == 0) continue;
      for (int j = g; j < std::min(n, g + 8); ++j) {
        if (!match[j]) continue;
        const int64_t row = static_cast<U>(k[j] >> ps.pshift) == ps.pre0 ? 0 : ps.nbins;
        ++h[row + ((k[j] >> ps.dshift) & ps.dmask)];
      }
    }
  }
}

// m consecutive elements of one tensor, block by block; also compiled for AVX2 (wider key and match loops) and
// picked at run time. always_inline: the AVX2 clone must get its own copy of the loops, not a call to baseline code.
template <typename U, bool kAll>
__attribute__((always_inline)) inline void count_run(const U* p, int64_t m, uint32_t* h, const Pass<U>& ps) {
  for (int64_t i = 0; i < m; i += kBlock)
    count_block<U, kAll>(p + i, static_cast<int>(std::min<int64_t>(kBlock, m - i)), h, ps);
}

template <typename U, bool kAll>
FASTMASK_AVX2 void count_run_avx2(const U* p, int64_t m, uint32_t* h, const Pass<U>& ps) {
  count_run<U, kAll>(p, m, h, ps);
}

template <typename U>
inline bool any_nan(const U* __restrict p, int64_t n, U inf) {
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) nan |= keys::is_nan_bits(p[j], inf);
  return nan;
}

// One histogram pass. Returns rows x 2^digit_bits int64 counts; when check_nan, *nan_tensor is
// set to the lowest index of a tensor holding a NaN (or -1).
template <typename U>
std::vector<int64_t> histogram_pass(const Inputs& in, keys::Format fmt, const std::vector<uint64_t>& prefixes,
                                    int prefix_bits, int digit_bits, bool check_nan, int64_t* nan_tensor) {
  constexpr int W = sizeof(U) * 8;
  const int nrows = static_cast<int>(prefixes.size());
  const int64_t nbins = int64_t{1} << digit_bits;
  const Pass<U> ps{prefix_bits == 0 ? 0 : W - prefix_bits, W - prefix_bits - digit_bits,
                   static_cast<U>(nbins - 1), static_cast<U>(prefixes[0]),
                   static_cast<U>(prefixes[nrows > 1 ? 1 : 0]), nbins};
  const U inf = static_cast<U>(keys::inf_bits(fmt));
  const int64_t total = in.offsets.back();
  const int64_t nchunks = chunk_count(0, total);
  const bool avx2 = FASTMASK_HAS_AVX2();
  const auto count = prefix_bits == 0 ? (avx2 ? count_run_avx2<U, true> : count_run<U, true>)
                                      : (avx2 ? count_run_avx2<U, false> : count_run<U, false>);

  std::vector<int64_t> out(static_cast<size_t>(nrows * nbins), 0);
  int64_t nan_min = std::numeric_limits<int64_t>::max();
#pragma omp parallel num_threads(threads_for(total))
  {
    // uint32 per-thread counts stay in L2; they are flushed into the int64 totals before they could overflow, so any
    // n (> 2^31 included) is counted exactly.
    const int64_t copies = prefix_bits == 0 ? kFirstPassCopies : 1;
    std::vector<uint32_t> local(static_cast<size_t>(copies * nrows * nbins), 0);
    uint64_t since_flush = 0;
    int64_t my_nan = std::numeric_limits<int64_t>::max();
    const auto flush = [&] {
#pragma omp critical(fastmask_percentile_flush)
      for (size_t i = 0; i < local.size(); ++i) out[i % out.size()] += local[i];  // copies are row-major blocks
      std::fill(local.begin(), local.end(), 0u);
      since_flush = 0;
    };
#pragma omp for schedule(dynamic, 1) nowait  // the flush below needs no other thread: one barrier per pass
    for (int64_t c = 0; c < nchunks; ++c) {
      if (since_flush + kChunk > std::numeric_limits<uint32_t>::max()) flush();
      const auto [lo, hi] = chunk(0, total, c);
      for_each_piece(in.offsets, lo, hi, [&](size_t t, int64_t b, int64_t e) {
        const U* p = static_cast<const U*>(in.ptr[t]) + b;
        const auto ti = static_cast<int64_t>(t);
        if (check_nan && ti < my_nan && any_nan(p, e - b, inf)) my_nan = ti;
        count(p, e - b, local.data(), ps);
      });
      since_flush += static_cast<uint64_t>(hi - lo);
    }
    flush();
#pragma omp critical(fastmask_percentile_nan)
    nan_min = std::min(nan_min, my_nan);
  }
  if (nan_tensor != nullptr) *nan_tensor = nan_min == std::numeric_limits<int64_t>::max() ? -1 : nan_min;
  return out;
}

// Dispatches on the storage width: the keys only need the bit patterns.
std::vector<int64_t> histogram_cpu(const std::vector<at::Tensor>& ts, const Inputs& in,
                                   const std::vector<uint64_t>& prefixes, int prefix_bits, int digit_bits,
                                   const char* op) {
  const auto dtype = ts[0].scalar_type();
  const bool check_nan = prefix_bits == 0;  // every element is read in the first pass
  int64_t nan_tensor = -1;
  std::vector<int64_t> h;
  switch (key_bits(dtype)) {
    case 16:
      h = histogram_pass<uint16_t>(in, key_format(dtype), prefixes, prefix_bits, digit_bits, check_nan, &nan_tensor);
      break;
    case 32:
      h = histogram_pass<uint32_t>(in, key_format(dtype), prefixes, prefix_bits, digit_bits, check_nan, &nan_tensor);
      break;
    default:
      h = histogram_pass<uint64_t>(in, key_format(dtype), prefixes, prefix_bits, digit_bits, check_nan, &nan_tensor);
  }
  if (nan_tensor >= 0) raise_nan(nan_tensor, ts[static_cast<size_t>(nan_tensor)], op);
  return h;
}

at::Tensor radix_histogram_cpu(at::TensorList tensors, at::IntArrayRef prefixes, int64_t prefix_bits,
                               int64_t digit_bits) {
  const char* op = "fastmask.radix_histogram";
  const auto ts = checked_contiguous(tensors, op);
  const auto pre = checked_prefixes(key_bits(ts[0].scalar_type()), prefixes, prefix_bits, digit_bits, op);
  const auto h = histogram_cpu(ts, inputs_of(ts), pre, static_cast<int>(prefix_bits), static_cast<int>(digit_bits),
                               op);
  auto out = at::empty({static_cast<int64_t>(pre.size()), int64_t{1} << digit_bits},
                       at::TensorOptions().dtype(at::kLong));
  std::memcpy(out.data_ptr<int64_t>(), h.data(), h.size() * sizeof(int64_t));
  return out;
}

// 0/1 bytes m[j] = (x_j > t) (or >=) for a block of storage bit patterns. Signed keys (the unsigned key with its top
// bit flipped) let SSE2 / AVX2 compare them directly; NaN (|bits| above inf) never passes, as in numpy.
template <typename S, typename C, int kWiden, bool kInclusive>
__attribute__((always_inline)) inline void mask_block(const S* __restrict p, int n, C skey, C inf,
                                                      uint8_t* __restrict m) {
  using SC = std::make_signed_t<C>;
  constexpr SC kMag = std::numeric_limits<SC>::max();
  for (int j = 0; j < n; ++j) {
    const SC w = static_cast<SC>(static_cast<C>(static_cast<C>(p[j]) << kWiden));
    const SC k = static_cast<SC>(w ^ ((w >> (sizeof(C) * 8 - 1)) & kMag));
    const bool pass = kInclusive ? k >= static_cast<SC>(skey) : k > static_cast<SC>(skey);
    m[j] = static_cast<uint8_t>(pass & ((w & kMag) <= static_cast<SC>(inf)));
  }
}

// Blocks [b, e) of one tensor of n elements: 0/1 bytes, or packed little-endian bits (byte j holds elements
// 8j..8j+7, element 8j + i in bit i, as np.packbits(bitorder="little"); the tail byte's unused bits are 0).
template <typename S, typename C, int kWiden, bool kInclusive>
__attribute__((always_inline)) inline void mask_run(const S* p, int64_t n, int64_t b, int64_t e, C skey, C inf,
                                                    bool packed, uint8_t* out) {
  uint8_t m[kBlock];
  for (int64_t blk = b; blk < e; ++blk) {
    const int64_t i = blk * kBlock;
    const int len = static_cast<int>(std::min<int64_t>(kBlock, n - i));
    if (!packed) {
      mask_block<S, C, kWiden, kInclusive>(p + i, len, skey, inf, out + i);
      continue;
    }
    mask_block<S, C, kWiden, kInclusive>(p + i, len, skey, inf, m);
    std::fill(m + len, m + ((len + 7) & ~7), uint8_t{0});
    for (int j = 0; j < (len + 7) / 8; ++j) {
      // Eight 0/1 bytes -> one byte: the multiply moves byte i's bit to bit 56 + i, with no carries between them.
      uint64_t eight;
      std::memcpy(&eight, m + 8 * j, sizeof eight);
      out[i / 8 + j] = static_cast<uint8_t>((eight * 0x0102040810204080ull) >> 56);
    }
  }
}

template <typename S, typename C, int kWiden, bool kInclusive>
FASTMASK_AVX2 void mask_run_avx2(const S* p, int64_t n, int64_t b, int64_t e, C skey, C inf, bool packed,
                                 uint8_t* out) {
  mask_run<S, C, kWiden, kInclusive>(p, n, b, e, skey, inf, packed, out);
}

// Every tensor's mask in one parallel region over the virtual array of kBlock-element blocks (blocks never straddle
// two tensors, and a packed block owns whole bytes).
template <typename S, typename C, int kWiden, bool kInclusive>
void mask_all(const std::vector<at::Tensor>& ts, const std::vector<at::Tensor>& masks, C key, bool packed) {
  const C skey = static_cast<C>(key ^ keys::sign_bit<C>());
  const C inf = static_cast<C>(keys::inf_bits(sizeof(C) == 2 ? keys::Format::kHalf
                                                              : (sizeof(C) == 4 ? keys::Format::kFloat
                                                                                : keys::Format::kDouble)));
  std::vector<int64_t> blocks;
  for (const auto& t : ts) blocks.push_back((t.numel() + kBlock - 1) / kBlock);
  const std::vector<int64_t> offsets = prefix_offsets(blocks);
  const int64_t total = offsets.back(), per_chunk = kChunk / kBlock;
  const int64_t nchunks = (total + per_chunk - 1) / per_chunk;
  const auto run = FASTMASK_HAS_AVX2() ? mask_run_avx2<S, C, kWiden, kInclusive> : mask_run<S, C, kWiden, kInclusive>;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(total * kBlock))
  for (int64_t c = 0; c < nchunks; ++c) {
    for_each_piece(offsets, c * per_chunk, std::min(total, (c + 1) * per_chunk), [&](size_t t, int64_t b, int64_t e) {
      run(static_cast<const S*>(ts[t].data_ptr()), ts[t].numel(), b, e, skey, inf, packed,
          static_cast<uint8_t*>(masks[t].data_ptr()));
    });
  }
}

template <typename S, typename C, int kWiden>
void mask_dispatch(const std::vector<at::Tensor>& ts, const std::vector<at::Tensor>& masks, uint64_t key,
                   bool inclusive, bool packed) {
  if (inclusive)
    mask_all<S, C, kWiden, true>(ts, masks, static_cast<C>(key), packed);
  else
    mask_all<S, C, kWiden, false>(ts, masks, static_cast<C>(key), packed);
}

std::vector<at::Tensor> hard_mask_cpu(at::TensorList tensors, double threshold, bool inclusive,
                                      std::string_view layout) {
  const auto ts = checked_contiguous(tensors, "fastmask.hard_mask");
  const Layout lay = parse_layout(layout);
  const auto dtype = ts[0].scalar_type();
  const MaskThreshold th = mask_threshold(dtype, threshold, inclusive);
  const bool packed = lay == Layout::kPacked;
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(empty_mask(t, lay));
  if (th.never) {
    for (auto& m : out) m.zero_();
  } else if (dtype == at::kHalf) {
    mask_dispatch<uint16_t, uint16_t, 0>(ts, out, th.key, inclusive, packed);
  } else if (dtype == at::kBFloat16) {  // compared through the exact float32 upcast: bits << 16
    mask_dispatch<uint16_t, uint32_t, 16>(ts, out, th.key, inclusive, packed);
  } else if (dtype == at::kFloat) {
    mask_dispatch<uint32_t, uint32_t, 0>(ts, out, th.key, inclusive, packed);
  } else {
    mask_dispatch<uint64_t, uint64_t, 0>(ts, out, th.key, inclusive, packed);
  }
  return out;
}

}  // namespace
}  // namespace percentile
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CPU, m) {
  m.impl("radix_histogram", &fastmask::percentile::radix_histogram_cpu);
  m.impl("hard_mask", &fastmask::percentile::hard_mask_cpu);
}
