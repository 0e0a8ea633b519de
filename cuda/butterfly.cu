// CUDA kernels of butterfly (x @ M_{m-1} ... M_0, BOFT's chain of butterfly factors) and its backward.
//
// Factor i only mixes columns inside chunks of b * 2^i, so a CTA owns one column tile of TW = C * 2^p
// columns (C = b * 2^(m-1)) and loops over row tiles of TR rows, each held in shared memory in the
// accumulation type with all m factors' rotations of those columns staged once per CTA. A factor is one
// pass of work items of ROWS rows x one b x b block: gather the block's entries into registers, multiply
// by the rotation (a shared-memory broadcast: the lanes of a warp share a block), scatter back. Backward
// keeps every factor's input tile and the gradient tile, sums grad_rotations per CTA in shared memory and
// writes it once as a per-CTA partial that the host reduces (deterministic). Block sizes other than 2..64
// (powers of two), or a tile that does not fit in shared memory, take an ATen path, factor by factor.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "utils.cuh"

namespace orthoft {
namespace {

using cuda::acc_t;
using cuda::ceil_div;
using cuda::load_vec;
using cuda::store_vec;
using cuda::Vec;

constexpr int kThreads = 256;

// Compile-time shape of the work for block size B in accumulation type acc.
template <typename acc, int B>
struct Shape {
  static_assert(B >= 2 && B % 2 == 0, "the fused kernels take even block sizes");
  static constexpr int H = B / 2;  // a block's entries form two runs of H contiguous columns
  static constexpr int kVec = 16 / static_cast<int>(sizeof(acc));  // values per 16-byte shared access
  static constexpr int kRunVec = H < kVec ? H : kVec;
  static constexpr int kRotVec = B < kVec ? B : kVec;
  static constexpr int kRows = B >= 16 ? 1 : (B >= 4 ? 16 / B : 8);  // rows per work item (reuse of R)
  static constexpr int kCols = B < 4 * kVec ? B : 4 * kVec;           // outputs per pass over the inputs
  // grad_rotations: a thread sums a kSub x kSub piece of a block over every kGroups-th row of the tile,
  // then the kGroups lanes of a piece reduce-scatter it.
  static constexpr int kSub = B < 4 ? B : 4;
  static constexpr int kSubVals = kSub * kSub;
  static constexpr int kGroups = kSubVals < 8 ? kSubVals : 8;
  // Narrower tiles would leave threads idle in the grad_rotations pass.
  static constexpr int kMinTileCols = B <= 4 ? 128 : 64;
};

struct Params {
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
  using S = Shape<acc, B>;
#pragma unroll
  for (int q = 0; q < ROWS; ++q) {
    const acc* row = tile + (row0 + q * row_step) * ld;
#pragma unroll
    for (int t = 0; t < B; t += S::kRunVec) {
      const auto w = load_vec<S::kRunVec>(row + entry_col<B>(t, base0, base1));
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
  constexpr int W = Shape<acc, B>::kRunVec < COLS ? Shape<acc, B>::kRunVec : COLS;
#pragma unroll
  for (int q = 0; q < ROWS; ++q) {
    acc* row = tile + (row0 + q * row_step) * ld;
#pragma unroll
    for (int u = 0; u < COLS; u += W) {
      Vec<acc, W> w;
#pragma unroll
      for (int e = 0; e < W; ++e) {
        w.val[e] = out[q][u + e];
      }
      store_vec<W>(row + entry_col<B>(j0 + u, base0, base1), w);
    }
  }
}

// dst = src @ M_i on the tile (dst may be src): each block's entries v become v @ R, or v @ R^T for the
// gradient. rot holds this factor's rotations of the tile, [nblk][B][B].
template <typename acc, int B, bool kTransposed>
__device__ void apply_factor(const acc* src, acc* dst, const acc* rot, int i, int nblk, int tr, int ld) {
  using S = Shape<acc, B>;
  constexpr int ROWS = S::kRows;
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
            const auto w = load_vec<S::kRotVec>(r + t * B + j0 + u);
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
            const auto w = load_vec<S::kRotVec>(r + (j0 + u) * B + j);
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

// out = the N entries t0 .. t0 + N - 1 of the block in one tile row.
template <typename acc, int B, int N>
__device__ __forceinline__ void load_entries(const acc* row, int base0, int base1, int t0, acc (&out)[N]) {
  using S = Shape<acc, B>;
  if constexpr (N <= S::H) {  // inside one run: contiguous and aligned to N
    constexpr int W = N < S::kVec ? N : S::kVec;
    const acc* p = row + entry_col<B>(t0, base0, base1);
#pragma unroll
    for (int e = 0; e < N; e += W) {
      const auto w = load_vec<W>(p + e);
#pragma unroll
      for (int u = 0; u < W; ++u) {
        out[e + u] = w.val[u];
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      out[e] = row[entry_col<B>(t0 + e, base0, base1)];
    }
  }
}

// Sums v over the G lanes g = lane % G by recursive halving: lane g ends with the sums of values
// [g * NV/G, (g+1) * NV/G) in v[0 .. NV/G). Every lane of the warp must call it.
template <int O, int NV, int G, typename acc>
__device__ __forceinline__ void reduce_scatter(acc (&v)[NV], int g) {
  if constexpr (O >= 1) {
    constexpr int half = NV * O / G;
    const bool upper = g & O;
#pragma unroll
    for (int k = 0; k < half; ++k) {
      const acc send = upper ? v[k] : v[k + half];
      const acc keep = upper ? v[k + half] : v[k];
      v[k] = keep + __shfl_xor_sync(0xffffffffu, send, O);
    }
    reduce_scatter<O / 2, NV, G>(v, g);
  }
}

// dr[blk] += sum over the tile's rows of in_blk^T gout_blk (outer products of the gathered entries).
template <typename acc, int B>
__device__ void accumulate_grad_rotations(const acc* in, const acc* gout, acc* dr, int i, int nblk, int tr,
                                          int ld) {
  using S = Shape<acc, B>;
  constexpr int N = S::kSub;
  constexpr int G = S::kGroups;
  constexpr int kPer = B / N;  // pieces per block side
  const int pieces = nblk * kPer * kPer;
  const int g = threadIdx.x % G;
  // The trip count is the same for every thread: reduce_scatter needs whole warps.
  for (int p0 = 0; p0 < pieces; p0 += kThreads / G) {
    const int piece = p0 + threadIdx.x / G;
    const bool active = piece < pieces;
    const int blk = piece / (kPer * kPer);
    const int t0 = piece / kPer % kPer * N;
    const int j0 = piece % kPer * N;
    acc sum[N * N] = {};
    if (active) {
      const int base0 = run_start<B>(blk, i, 0);
      const int base1 = run_start<B>(blk, i, 1);
      for (int r = g; r < tr; r += G) {
        acc a[N], c[N];
        load_entries<acc, B, N>(in + r * ld, base0, base1, t0, a);
        load_entries<acc, B, N>(gout + r * ld, base0, base1, j0, c);
#pragma unroll
        for (int x = 0; x < N; ++x) {
#pragma unroll
          for (int y = 0; y < N; ++y) {
            sum[x * N + y] += a[x] * c[y];
          }
        }
      }
    }
    reduce_scatter<G / 2, N * N, G>(sum, g);
    if (active) {
#pragma unroll
      for (int k = 0; k < N * N / G; ++k) {
        const int e = g * (N * N / G) + k;
        dr[blk * B * B + (t0 + e / N) * B + j0 + e % N] += sum[k];
      }
    }
  }
}

// tile = rows [row0, row0 + tr) x columns [col0, col0 + tw) of src, zero past the last row.
template <typename scalar_t, typename acc>
__device__ void load_tile(const scalar_t* __restrict__ src, acc* tile, int64_t row0, int64_t col0, const Params& p) {
  constexpr int VG = 16 / sizeof(scalar_t);
  constexpr int VS = 16 / sizeof(acc);
  constexpr int kBatch = 4;  // loads in flight per thread before the first shared store
  if (p.vec) {
    const int per_row = p.tw / VG;
    const int total = p.tr * per_row;
    for (int first = threadIdx.x; first < total; first += kThreads * kBatch) {
      Vec<scalar_t, VG> w[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int idx = first + k * kThreads;
        const int r = idx / per_row;
        if (idx < total && row0 + r < p.rows) {
          w[k] = load_vec<VG>(src + (row0 + r) * p.n + col0 + (idx - r * per_row) * VG);
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
            Vec<acc, VS> s;
#pragma unroll
            for (int u = 0; u < VS; ++u) {
              s.val[u] = static_cast<acc>(w[k].val[e + u]);
            }
            store_vec<VS>(dst + e, s);
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
__device__ void store_tile(const acc* tile, scalar_t* __restrict__ dst, int64_t row0, int64_t col0, const Params& p) {
  constexpr int VG = 16 / sizeof(scalar_t);
  constexpr int VS = 16 / sizeof(acc);
  const int rows = static_cast<int>(std::min<int64_t>(p.tr, p.rows - row0));
  if (p.vec) {
    const int per_row = p.tw / VG;
    for (int idx = threadIdx.x; idx < rows * per_row; idx += kThreads) {
      const int r = idx / per_row;
      const int cv = idx - r * per_row;
      const acc* src = tile + r * p.ld + cv * VG;
      Vec<scalar_t, VG> w;
#pragma unroll
      for (int e = 0; e < VG; e += VS) {
        const auto s = load_vec<VS>(src + e);
#pragma unroll
        for (int u = 0; u < VS; ++u) {
          w.val[e + u] = static_cast<scalar_t>(s.val[u]);
        }
      }
      store_vec<VG>(dst + (row0 + r) * p.n + col0 + cv * VG, w);
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
__device__ void stage_rotations(const scalar_t* __restrict__ rotations, acc* rot, const Params& p, int nblk) {
  const int per_factor = nblk * B * B;
  for (int idx = threadIdx.x; idx < p.m * per_factor; idx += kThreads) {
    const int i = idx / per_factor;
    rot[idx] = static_cast<acc>(
        rotations[(i * p.num_blocks + static_cast<int64_t>(blockIdx.x) * nblk) * B * B + idx - i * per_factor]);
  }
}

// grid: (column tiles, row splits); a CTA takes row tiles blockIdx.y, blockIdx.y + gridDim.y, ...
template <typename scalar_t, int B>
__global__ void __launch_bounds__(kThreads)
    butterfly_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ rotations,
                     scalar_t* __restrict__ y, const Params p) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int nblk = p.tw / B;
  const int per_factor = nblk * B * B;
  acc* rot = reinterpret_cast<acc*>(smem);
  acc* tile = rot + p.m * per_factor;
  stage_rotations<scalar_t, acc, B>(rotations, rot, p, nblk);
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * p.tw;
  for (int64_t rt = blockIdx.y; rt < p.row_tiles; rt += gridDim.y) {
    __syncthreads();  // rotations staged, previous tile stored
    load_tile(x, tile, rt * p.tr, col0, p);
    __syncthreads();
    for (int i = p.m - 1; i >= 0; --i) {
      apply_factor<acc, B, false>(tile, tile, rot + i * per_factor, i, nblk, p.tr, p.ld);
      __syncthreads();
    }
    store_tile(tile, y, rt * p.tr, col0, p);
  }
}

// Same grid. act(i) holds the input of factor i (act(m-1) = x), g the gradient of the current factor's
// output, updated in place to its input's gradient. partial: [gridDim.y][m][D][B][B].
template <typename scalar_t, int B>
__global__ void __launch_bounds__(kThreads)
    butterfly_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ rotations, scalar_t* __restrict__ grad_x,
                              acc_t<scalar_t>* __restrict__ partial, const Params p) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int nblk = p.tw / B;
  const int per_factor = nblk * B * B;
  acc* rot = reinterpret_cast<acc*>(smem);
  acc* dr = rot + p.m * per_factor;
  acc* acts = dr + p.m * per_factor;
  acc* g = acts + p.m * p.tile_elems;
  auto act = [&](int i) { return acts + i * p.tile_elems; };
  stage_rotations<scalar_t, acc, B>(rotations, rot, p, nblk);
  for (int idx = threadIdx.x; idx < p.m * per_factor; idx += kThreads) {
    dr[idx] = acc(0);
  }
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * p.tw;
  for (int64_t rt = blockIdx.y; rt < p.row_tiles; rt += gridDim.y) {
    __syncthreads();  // staging done, previous tile stored
    load_tile(x, act(p.m - 1), rt * p.tr, col0, p);
    load_tile(grad, g, rt * p.tr, col0, p);
    __syncthreads();
    for (int i = p.m - 1; i >= 1; --i) {
      apply_factor<acc, B, false>(act(i), act(i - 1), rot + i * per_factor, i, nblk, p.tr, p.ld);
      __syncthreads();
    }
    for (int i = 0; i < p.m; ++i) {
      accumulate_grad_rotations<acc, B>(act(i), g, dr + i * per_factor, i, nblk, p.tr, p.ld);
      __syncthreads();
      apply_factor<acc, B, true>(g, g, rot + i * per_factor, i, nblk, p.tr, p.ld);
      __syncthreads();
    }
    store_tile(g, grad_x, rt * p.tr, col0, p);
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < p.m * per_factor; idx += kThreads) {
    const int i = idx / per_factor;
    partial[((static_cast<int64_t>(blockIdx.y) * p.m + i) * p.num_blocks + static_cast<int64_t>(blockIdx.x) * nblk) *
                B * B +
            idx - i * per_factor] = dr[idx];
  }
}

// Shared-memory row stride: a multiple of the 16-byte vector with an odd count of them, so 16-byte
// accesses by lanes on consecutive rows of one column fall in distinct banks.
int tile_ld(int tw, int vec) {
  if (tw % vec != 0) {
    return tw + 1;
  }
  return (tw / vec) % 2 == 1 ? tw : tw + vec;
}

struct Launch {
  Params p;
  int64_t smem;  // bytes
  int splits;    // gridDim.y
};

// Tile shape and grid for block size B, or false when one tile of the smallest height does not fit.
template <typename scalar_t, int B, typename Kernel>
bool plan(Kernel kernel, int64_t rows, int64_t n, int m, bool backward, Launch& out) {
  using S = Shape<acc_t<scalar_t>, B>;
  const int64_t chunk = static_cast<int64_t>(B) << (m - 1);
  if (m > 20 || chunk > (1 << 16)) {
    return false;
  }
  int tw = static_cast<int>(chunk);
  while (tw < S::kMinTileCols && n % (2 * tw) == 0) {
    tw *= 2;
  }
  Params& p = out.p;
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
  int want = S::kRows;
  while (want < max_tr && want < rows) {
    want *= 2;
  }
  const int64_t limit = cuda::max_dynamic_smem();
  int tr = 0;
  for (const int64_t budget : {limit / 2, limit}) {
    for (int t = want; t >= S::kRows && tr == 0; t /= 2) {
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

  cuda::allow_dynamic_smem(kernel, out.smem);
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, out.smem));
  const int64_t slots = static_cast<int64_t>(std::max(per_sm, 1)) *
                        cuda::device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t col_tiles = n / tw;
  TORCH_CHECK(col_tiles <= std::numeric_limits<int32_t>::max(), "orthoft.ops.butterfly: too many columns, ", n);
  // One wave of CTAs, each looping over its share of the row tiles (rotations staged once per CTA).
  out.splits = static_cast<int>(std::clamp<int64_t>(slots / col_tiles, 1, std::min<int64_t>(p.row_tiles, 65535)));
  return true;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

// Calls f with the block size as a compile-time constant; false for block sizes without a fused kernel.
template <typename F>
bool dispatch_block_size(int64_t b, F&& f) {
  switch (b) {
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 8:
      return f(std::integral_constant<int, 8>{});
    case 16:
      return f(std::integral_constant<int, 16>{});
    case 32:
      return f(std::integral_constant<int, 32>{});
    case 64:
      return f(std::integral_constant<int, 64>{});
    default:
      return false;
  }
}

// The ATen path. Blocks of factor i as (D, rows, b): column k*c + s*c/2 + d*h + u (c = b * 2^i, h = b/2)
// is entry s*h + u of block k * 2^i + d; factor 0 is plain consecutive blocks.
at::Tensor gather_blocks(const at::Tensor& y, int64_t b, int64_t i) {
  const int64_t rows = y.size(0), n = y.size(1);
  if (i == 0) {
    return y.view({rows, n / b, b}).transpose(0, 1);
  }
  const int64_t group = int64_t{1} << i;
  return y.view({rows, n / (b * group), 2, group, b / 2}).permute({1, 3, 0, 2, 4}).reshape({n / b, rows, b});
}

at::Tensor scatter_blocks(const at::Tensor& blocks, int64_t b, int64_t i) {
  const int64_t rows = blocks.size(1), n = blocks.size(0) * b;
  if (i == 0) {
    return blocks.transpose(0, 1).reshape({rows, n});
  }
  const int64_t group = int64_t{1} << i;
  return blocks.view({n / (b * group), group, rows, 2, b / 2}).permute({2, 0, 3, 1, 4}).reshape({rows, n});
}

at::Tensor apply_factor_aten(const at::Tensor& y, const at::Tensor& rot, int64_t b, int64_t i) {
  return scatter_blocks(at::bmm(gather_blocks(y, b, i), rot[i]), b, i);
}

at::Tensor butterfly_aten(const at::Tensor& x, const at::Tensor& rotations, int64_t b) {
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor rot = rotations.to(acc_type);
  at::Tensor y = x.to(acc_type);
  for (int64_t i = rot.size(0) - 1; i >= 0; --i) {
    y = apply_factor_aten(y, rot, b, i);
  }
  return y.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> butterfly_backward_aten(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& rotations, int64_t b) {
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor rot = rotations.to(acc_type);
  const int64_t m = rot.size(0);
  std::vector<at::Tensor> inputs(m);
  inputs[m - 1] = x.to(acc_type);
  for (int64_t i = m - 1; i >= 1; --i) {
    inputs[i - 1] = apply_factor_aten(inputs[i], rot, b, i);
  }
  at::Tensor g = grad.to(acc_type);
  std::vector<at::Tensor> grad_rot(m);
  for (int64_t i = 0; i < m; ++i) {
    const at::Tensor gb = gather_blocks(g, b, i);
    grad_rot[i] = at::bmm(gather_blocks(inputs[i], b, i).transpose(1, 2), gb);
    g = scatter_blocks(at::bmm(gb, rot[i].transpose(1, 2)), b, i);
  }
  return {g.to(x.scalar_type()), at::stack(grad_rot).to(x.scalar_type())};
}

at::Tensor butterfly_cuda(const at::Tensor& x, const at::Tensor& rotations, int64_t block_size) {
  check_butterfly(x, rotations, block_size);
  TORCH_CHECK(x.is_cuda(), "orthoft.ops.butterfly: x must be a CUDA tensor, got ", x.device());
  const at::cuda::OptionalCUDAGuard device_guard(device_of(x));
  const int64_t n = x.size(-1);
  if (x.numel() == 0) {
    return at::empty_like(x, at::MemoryFormat::Contiguous);
  }
  const at::Tensor x2 = x.reshape({-1, n}).contiguous();
  const at::Tensor rot = rotations.contiguous();
  const int64_t rows = x2.size(0);
  const int m = static_cast<int>(rot.size(0));
  at::Tensor y = at::empty_like(x2);

  bool fused = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), "orthoft_butterfly_cuda", [&] {
    fused = dispatch_block_size(block_size, [&](auto bs) {
      constexpr int B = decltype(bs)::value;
      const auto kernel = butterfly_kernel<scalar_t, B>;
      Launch l;
      if (!plan<scalar_t, B>(kernel, rows, n, m, /*backward=*/false, l)) {
        return false;
      }
      constexpr int VG = 16 / sizeof(scalar_t);
      l.p.vec = n % VG == 0 && l.p.tw % VG == 0 && aligned16(x2) && aligned16(y);
      const dim3 grid(static_cast<unsigned>(n / l.p.tw), static_cast<unsigned>(l.splits));
      kernel<<<grid, kThreads, l.smem, c10::cuda::getCurrentCUDAStream()>>>(
          x2.const_data_ptr<scalar_t>(), rot.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), l.p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return true;
    });
  });
  if (!fused) {
    y = butterfly_aten(x2, rot, block_size);
  }
  return y.view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor> butterfly_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& rotations, int64_t block_size) {
  check_butterfly_backward(grad, x, rotations, block_size);
  TORCH_CHECK(x.is_cuda(), "orthoft.ops.butterfly_backward: x must be a CUDA tensor, got ", x.device());
  const at::cuda::OptionalCUDAGuard device_guard(device_of(x));
  const int64_t n = x.size(-1);
  if (x.numel() == 0) {  // no rows: nothing flows to the rotations
    return {at::empty_like(x, at::MemoryFormat::Contiguous),
            at::zeros_like(rotations, at::MemoryFormat::Contiguous)};
  }
  const at::Tensor x2 = x.reshape({-1, n}).contiguous();
  const at::Tensor g2 = grad.reshape({-1, n}).contiguous();
  const at::Tensor rot = rotations.contiguous();
  const int64_t rows = x2.size(0);
  const int m = static_cast<int>(rot.size(0));
  at::Tensor grad_x = at::empty_like(x2);
  at::Tensor grad_rot;

  bool fused = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), "orthoft_butterfly_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    fused = dispatch_block_size(block_size, [&](auto bs) {
      constexpr int B = decltype(bs)::value;
      const auto kernel = butterfly_backward_kernel<scalar_t, B>;
      Launch l;
      if (!plan<scalar_t, B>(kernel, rows, n, m, /*backward=*/true, l)) {
        return false;
      }
      constexpr int VG = 16 / sizeof(scalar_t);
      l.p.vec = n % VG == 0 && l.p.tw % VG == 0 && aligned16(x2) && aligned16(g2) && aligned16(grad_x);
      at::Tensor partial = at::empty({l.splits, m, n / B, B, B}, x2.options().dtype(c10::CppTypeToScalarType<acc>::value));
      const dim3 grid(static_cast<unsigned>(n / l.p.tw), static_cast<unsigned>(l.splits));
      kernel<<<grid, kThreads, l.smem, c10::cuda::getCurrentCUDAStream()>>>(
          g2.const_data_ptr<scalar_t>(), x2.const_data_ptr<scalar_t>(), rot.const_data_ptr<scalar_t>(),
          grad_x.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc>(), l.p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_rot = (l.splits == 1 ? partial[0] : partial.sum(0)).to(x2.scalar_type());
      return true;
    });
  });
  if (!fused) {
    std::tie(grad_x, grad_rot) = butterfly_backward_aten(g2, x2, rot, block_size);
  }
  return {grad_x.view(x.sizes()), grad_rot};
}

}  // namespace

TORCH_LIBRARY_IMPL(orthoft, CUDA, m) {
  m.impl("butterfly", &butterfly_cuda);
  m.impl("butterfly_backward", &butterfly_backward_cuda);
}

}  // namespace orthoft
