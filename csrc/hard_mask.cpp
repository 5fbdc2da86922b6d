// CPU kernel of fastmask::hard_mask (schema in csrc/ops.cpp): the masks x > threshold (x >= threshold when
// inclusive) of every tensor, as numpy compares them (the threshold rounded to the tensors' dtype, NaN never passes),
// in one pass. The comparison is an integer one on order keys of the storage bits (csrc/order_keys.h,
// radix::mask_threshold), so it vectorises; layouts bool or bits (packed, int8).
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string_view>
#include <type_traits>
#include <vector>

#include "multi_tensor.h"
#include "radix.h"

namespace fastmask {
namespace radix {
namespace {

// Elements masked per block, the unit a thread takes from the virtual array of blocks (csrc/multi_tensor.h): blocks
// never straddle two tensors, and a multiple of 8 so that a packed block owns whole bytes.
constexpr int kBlock = 256;

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
  const bool packed = lay == Layout::kBits;
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
}  // namespace radix
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CPU, m) {
  m.impl("hard_mask", &fastmask::radix::hard_mask_cpu);
}
