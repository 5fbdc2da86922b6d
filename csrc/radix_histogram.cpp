// CPU kernel of fastmask::radix_histogram (schema in csrc/ops.cpp): one pass of the percentile's radix selection,
// whose driver is Python (fastmask/ops/radix.py). It streams every tensor once and counts, per row p, the elements
// whose top prefix_bits order-key bits (csrc/order_keys.h) equal prefixes[p], binned by their next digit_bits key
// bits; memory is one histogram per thread, whatever n. The driver takes 16 bits per pass on the CPU (2^16 uint32
// counts, 256 KiB per thread and row, stay in L2), so fp16 / bf16 take one pass, fp32 two and fp64 four.
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "multi_tensor.h"
#include "radix.h"

namespace fastmask {
namespace radix {

namespace {

// The tensors are one virtual array (csrc/multi_tensor.h): chunks of kChunk elements, shared out dynamically among
// the OpenMP threads, each visiting the pieces of the tensors it overlaps, in order.

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

// One radix pass's constants: bin = (key >> dshift) & dmask, for the keys whose top bits (key >> pshift) equal pre0
// (row 0) or pre1 (row 1); every key in the first pass.
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

// One histogram pass. Returns rows x 2^digit_bits int64 counts; when check_nan, *nan_tensor is set to the lowest
// index of a tensor holding a NaN (or -1).
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
#pragma omp critical(fastmask_radix_flush)
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
#pragma omp critical(fastmask_radix_nan)
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

}  // namespace
}  // namespace radix
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CPU, m) {
  m.impl("radix_histogram", &fastmask::radix::radix_histogram_cpu);
}
