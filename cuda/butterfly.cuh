// What the CUDA kernels of butterfly (x @ M_{m-1} ... M_0, BOFT's chain of butterfly factors) and of its
// backward share: tiles, the per-factor pass, and the launch plan. The kernels are in butterfly.cu and
// butterfly_backward.cu.
//
// Factor i only mixes columns inside chunks of b * 2^i, so a CTA owns one column tile of TW = C * 2^p
// columns (C = b * 2^(m-1)) and loops over row tiles of TR rows, each held in shared memory in the
// accumulation type with all m factors' rotations of those columns staged once per CTA. A factor is one
// pass of work items of ROWS rows x one b x b block: gather the block's entries into registers, multiply
// by the rotation (a shared-memory broadcast: the lanes of a warp share a block), scatter back. Backward
// keeps every factor's input tile and the gradient tile, sums grad_rotations per CTA in shared memory and
// writes it once as a per-CTA partial that the host reduces (deterministic). Block sizes other than 2..64
// (powers of two), or a tile that does not fit in shared memory, take the batched-matmul path of
// cpp/butterfly.h, factor by factor.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "butterfly.h"
#include "launch.cuh"

namespace orthoft {
namespace cuda {

constexpr int kThreads = 256;

// Compile-time shape of the work for block size B in accumulation type acc.
template <typename acc, int B>
struct BlockTraits {
  static_assert(B >= 2 && B % 2 == 0, "the fused kernels take even block sizes");
  static constexpr int H = B / 2;  // a block's entries form two runs of H contiguous columns
  static constexpr int kVec = 16 / static_cast<int>(sizeof(acc));  // values per 16-byte shared access
  static constexpr int kRunVec = H < kVec ? H : kVec;
  static constexpr int kRotVec = B < kVec ? B : kVec;
  static constexpr int kItemRows = B >= 16 ? 1 : (B >= 4 ? 16 / B : 8);  // rows per work item (reuse of R)
  static constexpr int kCols = B < 4 * kVec ? B : 4 * kVec;           // outputs per pass over the inputs
  // grad_rotations: a thread sums a kSub x kSub piece of a block over every kGroups-th row of the tile,
  // then the kGroups lanes of a piece reduce-scatter it.
  static constexpr int kSub = B < 4 ? B : 4;
  static constexpr int kSubVals = kSub * kSub;
  static constexpr int kGroups = kSubVals < 8 ? kSubVals : 8;
  // Narrower tiles would leave threads idle in the grad_rotations pass.
  static constexpr int kMinTileCols = B <= 4 ? 128 : 64;
};

struct TileShape {
  int64_t rows;        // rows of x, leading dimensions flattened
  int64_t n;           // columns of x
  int64_t num_blocks;  // D = n / b
  int64_t row_tiles;   // ceil(rows / tr)
  int m;               // factors
  int tw;              // columns of a tile
  int tr;              // rows of a tile
  int ld;              // shared-memory row stride of a tile
  int tile_elems;      // shared-memory size of a tile, a multiple of 16 bytes
  bool vec;            // 16-byte global accesses
};

// First column, inside the tile, of run `run` (entries [run*H, run*H + H)) of block `blk` of factor i.
// Block blk = k * 2^i + d lies in sub-chunk k of c_i = B * 2^i columns: d*H + t, then c_i/2 + d*H + t.
template <int B>
__device__ __forceinline__ int run_start(int blk, int i, int run) {
  constexpr int H = B / 2;
  return (blk >> i) * (B << i) + (blk & ((1 << i) - 1)) * H + run * (H << i);
}

// Column of entry t of a block whose runs start at base0 and base1.
template <int B>
__device__ __forceinline__ int entry_col(int t, int base0, int base1) {
  return t < B / 2 ? base0 + t : base1 + t - B / 2;
}

// v[q][:] = the B entries of the block in row row0 + q * row_step.
template <typename acc, int B, int ROWS>
__device__ __forceinline__ void gather(const acc* tile, int ld, int row0, int row_step, int base0, int base1,
                                       acc (&v)[ROWS][B]) {
  using S = BlockTraits<acc, B>;
#pragma unroll
  for (int q = 0; q < ROWS; ++q) {
    const acc* row = tile + (row0 + q * row_step) * ld;
#pragma unroll
    for (int t = 0; t < B; t += S::kRunVec) {
      const auto w = load_pack<S::kRunVec>(row + entry_col<B>(t, base0, base1));
#pragma unroll
      for (int e = 0; e < S::kRunVec; ++e) {
        v[q][t + e] = w.val[e];
      }
    }
  }
}

// Writes entries [j0, j0 + COLS) of the block in the same rows.
template <typename acc, int B, int ROWS, int COLS>
__device__ __forceinline__ void scatter(acc* tile, int ld, int row0, int row_step, int base0, int base1, int j0,
                                        const acc (&out)[ROWS][COLS]) {
  constexpr int W = BlockTraits<acc, B>::kRunVec < COLS ? BlockTraits<acc, B>::kRunVec : COLS;
#pragma unroll
  for (int q = 0; q < ROWS; ++q) {
    acc* row = tile + (row0 + q * row_step) * ld;
#pragma unroll
    for (int u = 0; u < COLS; u += W) {
      Pack<acc, W> w;
#pragma unroll
      for (int e = 0; e < W; ++e) {
        w.val[e] = out[q][u + e];
      }
      store_pack<W>(row + entry_col<B>(j0 + u, base0, base1), w);
    }
  }
}

// dst = src @ M_i on the tile (dst may be src): each block's entries v become v @ R, or v @ R^T for the
// gradient. rot holds this factor's rotations of the tile, [nblk][B][B].
template <typename acc, int B, bool kTransposed>
__device__ void apply_factor(const acc* src, acc* dst, const acc* rot, int i, int nblk, int tr, int ld) {
  using S = BlockTraits<acc, B>;
  constexpr int ROWS = S::kItemRows;
  const int slots = tr / ROWS;  // consecutive lanes take consecutive rows of one block
  for (int it = threadIdx.x; it < nblk * slots; it += kThreads) {
    const int blk = it / slots;
    const int slot = it - blk * slots;
    const int base0 = run_start<B>(blk, i, 0);
    const int base1 = run_start<B>(blk, i, 1);
    acc v[ROWS][B];
    gather<acc, B, ROWS>(src, ld, slot, slots, base0, base1, v);  // all inputs read before any write
    const acc* r = rot + blk * B * B;
#pragma unroll
    for (int j0 = 0; j0 < B; j0 += S::kCols) {
      acc out[ROWS][S::kCols] = {};
      if constexpr (!kTransposed) {  // out[:, j] = sum_t v[:, t] R[t][j]
#pragma unroll
        for (int t = 0; t < B; ++t) {
#pragma unroll
          for (int u = 0; u < S::kCols; u += S::kRotVec) {
            const auto w = load_pack<S::kRotVec>(r + t * B + j0 + u);
#pragma unroll
            for (int e = 0; e < S::kRotVec; ++e) {
#pragma unroll
              for (int q = 0; q < ROWS; ++q) {
                out[q][u + e] += v[q][t] * w.val[e];
              }
            }
          }
        }
      } else {  // out[:, t] = sum_j v[:, j] R[t][j]
#pragma unroll
        for (int u = 0; u < S::kCols; ++u) {
#pragma unroll
          for (int j = 0; j < B; j += S::kRotVec) {
            const auto w = load_pack<S::kRotVec>(r + (j0 + u) * B + j);
#pragma unroll
            for (int e = 0; e < S::kRotVec; ++e) {
#pragma unroll
              for (int q = 0; q < ROWS; ++q) {
                out[q][u] += v[q][j + e] * w.val[e];
              }
            }
          }
        }
      }
      scatter<acc, B, ROWS, S::kCols>(dst, ld, slot, slots, base0, base1, j0, out);
    }
  }
}

// tile = rows [row0, row0 + tr) x columns [col0, col0 + tw) of src, zero past the last row.
template <typename scalar_t, typename acc>
__device__ void load_tile(const scalar_t* __restrict__ src, acc* tile, int64_t row0, int64_t col0, const TileShape& p) {
  constexpr int VG = 16 / sizeof(scalar_t);
  constexpr int VS = 16 / sizeof(acc);
  constexpr int kBatch = 4;  // loads in flight per thread before the first shared store
  if (p.vec) {
    const int per_row = p.tw / VG;
    const int total = p.tr * per_row;
    for (int first = threadIdx.x; first < total; first += kThreads * kBatch) {
      Pack<scalar_t, VG> w[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int idx = first + k * kThreads;
        const int r = idx / per_row;
        if (idx < total && row0 + r < p.rows) {
          w[k] = load_pack<VG>(src + (row0 + r) * p.n + col0 + (idx - r * per_row) * VG);
        } else {
#pragma unroll
          for (int e = 0; e < VG; ++e) {
            w[k].val[e] = scalar_t(0);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int idx = first + k * kThreads;
        if (idx < total) {
          const int r = idx / per_row;
          acc* dst = tile + r * p.ld + (idx - r * per_row) * VG;
#pragma unroll
          for (int e = 0; e < VG; e += VS) {
            Pack<acc, VS> s;
#pragma unroll
            for (int u = 0; u < VS; ++u) {
              s.val[u] = static_cast<acc>(w[k].val[e + u]);
            }
            store_pack<VS>(dst + e, s);
          }
        }
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < p.tr * p.tw; idx += kThreads) {
      const int r = idx / p.tw;
      const int c = idx - r * p.tw;
      tile[r * p.ld + c] = row0 + r < p.rows ? static_cast<acc>(src[(row0 + r) * p.n + col0 + c]) : acc(0);
    }
  }
}

template <typename scalar_t, typename acc>
__device__ void store_tile(const acc* tile, scalar_t* __restrict__ dst, int64_t row0, int64_t col0,
                           const TileShape& p) {
  constexpr int VG = 16 / sizeof(scalar_t);
  constexpr int VS = 16 / sizeof(acc);
  const int rows = static_cast<int>(std::min<int64_t>(p.tr, p.rows - row0));
  if (p.vec) {
    const int per_row = p.tw / VG;
    for (int idx = threadIdx.x; idx < rows * per_row; idx += kThreads) {
      const int r = idx / per_row;
      const int cv = idx - r * per_row;
      const acc* src = tile + r * p.ld + cv * VG;
      Pack<scalar_t, VG> w;
#pragma unroll
      for (int e = 0; e < VG; e += VS) {
        const auto s = load_pack<VS>(src + e);
#pragma unroll
        for (int u = 0; u < VS; ++u) {
          w.val[e + u] = static_cast<scalar_t>(s.val[u]);
        }
      }
      store_pack<VG>(dst + (row0 + r) * p.n + col0 + cv * VG, w);
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * p.tw; idx += kThreads) {
      const int r = idx / p.tw;
      const int c = idx - r * p.tw;
      dst[(row0 + r) * p.n + col0 + c] = static_cast<scalar_t>(tile[r * p.ld + c]);
    }
  }
}

// rot[i][:] = rotations[i, blockIdx.x * nblk .. + nblk) for every factor i.
template <typename scalar_t, typename acc, int B>
__device__ void stage_rotations(const scalar_t* __restrict__ rotations, acc* rot, const TileShape& p, int nblk) {
  const int per_factor = nblk * B * B;
  for (int idx = threadIdx.x; idx < p.m * per_factor; idx += kThreads) {
    const int i = idx / per_factor;
    rot[idx] = static_cast<acc>(
        rotations[(i * p.num_blocks + static_cast<int64_t>(blockIdx.x) * nblk) * B * B + idx - i * per_factor]);
  }
}

// Shared-memory row stride: a multiple of the 16-byte vector with an odd count of them, so 16-byte
// accesses by lanes on consecutive rows of one column fall in distinct banks.
inline int tile_ld(int tw, int vec) {
  if (tw % vec != 0) {
    return tw + 1;
  }
  return (tw / vec) % 2 == 1 ? tw : tw + vec;
}

struct LaunchPlan {
  TileShape p;
  int64_t smem;  // bytes
  int splits;    // gridDim.y
};

// Tile shape and grid for block size B, or false when one tile of the smallest height does not fit.
template <typename scalar_t, int B, typename Kernel>
bool plan(Kernel kernel, int64_t rows, int64_t n, int m, bool backward, LaunchPlan& out) {
  using S = BlockTraits<acc_t<scalar_t>, B>;
  const int64_t chunk = static_cast<int64_t>(B) << (m - 1);
  if (m > 20 || chunk > (1 << 16)) {
    return false;
  }
  int tw = static_cast<int>(chunk);
  while (tw < S::kMinTileCols && n % (2 * tw) == 0) {
    tw *= 2;
  }
  TileShape& p = out.p;
  p.rows = rows;
  p.n = n;
  p.num_blocks = n / B;
  p.m = m;
  p.tw = tw;
  p.ld = tile_ld(tw, S::kVec);
  const int64_t rot_elems = static_cast<int64_t>(m) * tw * B * (backward ? 2 : 1);
  const int tiles = backward ? m + 1 : 1;
  auto smem_bytes = [&](int tr) {
    return (rot_elems + tiles * ceil_div(static_cast<int64_t>(tr) * p.ld, S::kVec) * S::kVec) *
           static_cast<int64_t>(sizeof(acc_t<scalar_t>));
  };
  // Tallest tile (a power of two, at most the rows there are) that leaves room for two CTAs per SM;
  // failing that, the tallest that fits at all.
  const int max_tr = backward ? 64 : 128;
  int want = S::kItemRows;
  while (want < max_tr && want < rows) {
    want *= 2;
  }
  const int64_t limit = max_dynamic_smem();
  int tr = 0;
  for (const int64_t budget : {limit / 2, limit}) {
    for (int t = want; t >= S::kItemRows && tr == 0; t /= 2) {
      if (smem_bytes(t) <= budget) {
        tr = t;
      }
    }
  }
  if (tr == 0) {
    return false;
  }
  p.tr = tr;
  p.tile_elems = static_cast<int>(ceil_div(static_cast<int64_t>(tr) * p.ld, S::kVec) * S::kVec);
  p.row_tiles = ceil_div(rows, tr);
  out.smem = smem_bytes(tr);

  allow_dynamic_smem(kernel, out.smem);
  int per_sm = 0;
  ORTHOFT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, out.smem));
  const int64_t slots = static_cast<int64_t>(std::max(per_sm, 1)) *
                        device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t col_tiles = n / tw;
  STD_TORCH_CHECK(col_tiles <= std::numeric_limits<int32_t>::max(), "orthoft.ops.butterfly: too many columns, ", n);
  // One wave of CTAs, each looping over its share of the row tiles (rotations staged once per CTA).
  out.splits = static_cast<int>(std::clamp<int64_t>(slots / col_tiles, 1, std::min<int64_t>(p.row_tiles, 65535)));
  return true;
}

inline bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

// Calls f with the block size as a compile-time constant; false for block sizes without a fused kernel.
template <typename F>
bool dispatch_block_size(int64_t b, F&& f) {
  return dispatch_constant<2, 4, 8, 16, 32, 64>(b, f);
}

}  // namespace cuda
}  // namespace orthoft
