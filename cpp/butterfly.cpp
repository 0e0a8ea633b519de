// CPU kernels of butterfly: y = x @ M_{m-1} ... M_0 and its backward, with permutations as index maps.
//
// Every factor mixes columns only inside chunks of C = b * 2^(m-1), so a task takes a tile of
// kTileRows rows x C columns, stores it column-major in the accumulation type (each update is then a
// fixed-length loop over rows that the compiler vectorises), applies all m factors in place and
// writes the tile once. One factor of wide blocks is a product per block instead, by the block kernel
// (each block's product written straight into its columns of the result) or by BLAS; so are factors
// of many rows, as one factor of their chunks (butterfly_chunks.cpp). The loops are
// compiled for AVX-512, AVX2+FMA and the baseline instruction set, in vectors of that set's width, and
// chosen at run time (cpu_isa.h).
#include <algorithm>
#include <optional>
#include <vector>

#include "butterfly.h"
#include "checks.h"
#include "cpu_isa.h"
#include "simd.h"

namespace orthoft {
namespace {

constexpr int64_t kTileRows = 32;
constexpr int64_t kMinTileColumns = 256;

// kTileRows rows of one tile column are kSimdPerColumn vectors (simd.h), which the tile's buffers hold.
template <typename T, int64_t Bytes>
constexpr int64_t kSimdPerColumn = kTileRows * sizeof(T) / Bytes;

// positions[i * C + blk * b + t]: the column, inside a tile of C columns, of element t of local block blk of
// factor i. Factor i splits the chunk into pieces of c = b * 2^i; block d of a piece takes b/2
// columns at d * b/2 and b/2 columns at c/2 + d * b/2 (factor 0: b contiguous columns).
std::vector<int64_t> butterfly_positions(int64_t b, int64_t m, int64_t chunk) {
  const int64_t half = b / 2;
  std::vector<int64_t> positions(m * chunk);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t piece = b << i;
    const int64_t blocks_per_piece = int64_t(1) << i;
    for (int64_t j = 0; j < chunk; ++j) {
      const int64_t blk = j / b;
      const int64_t t = j % b;
      const int64_t start = (blk / blocks_per_piece) * piece;
      const int64_t d = blk % blocks_per_piece;
      positions[i * chunk + j] = start + (t < half ? d * half + t : piece / 2 + d * half + t - half);
    }
  }
  return positions;
}

// Sizes of one call, and where a task's tile lies.
// A task's tile spans `chunk` columns: a whole number of the independent b * 2^(m-1) column groups,
// widened up to kMinTileColumns so that small groups do not make tiny tasks.
struct Tiling {
  int64_t n, b, m, chunk, rows, tiles, chunks;
  Tiling(const Tensor& x, const Tensor& rotations, int64_t block_size)
      : n(x.size(-1)), b(block_size), m(rotations.size(0)), chunk(block_size << (m - 1)) {
    const int64_t groups = n / chunk;
    for (int64_t k = groups; k >= 1; --k) {
      if (groups % k == 0 && k * chunk <= std::max(chunk, kMinTileColumns)) {
        chunk *= k;
        break;
      }
    }
    rows = n == 0 ? 0 : x.numel() / n;
    tiles = (rows + kTileRows - 1) / kTileRows;
    chunks = n / chunk;
  }
  int64_t blocks_per_chunk() const { return chunk / b; }
  int64_t factor_stride() const { return n * b; }  // elements of one factor's rotations
};

// Loads rows [first, first + rows) of one chunk, zero-padding the tile to kTileRows rows.
template <typename scalar_t, typename acc>
ORTHOFT_ALWAYS_INLINE void load_tile(const scalar_t* src, const Tiling& p, int64_t first, int64_t rows,
                                     int64_t chunk, acc* buf) {
  for (int64_t r = 0; r < kTileRows; ++r) {
    if (r < rows) {
      const scalar_t* row = src + (first + r) * p.n + chunk * p.chunk;
      for (int64_t j = 0; j < p.chunk; ++j) buf[j * kTileRows + r] = static_cast<acc>(row[j]);
    } else {
      for (int64_t j = 0; j < p.chunk; ++j) buf[j * kTileRows + r] = acc(0);
    }
  }
}

// Asks for the rows of the tile at (first, chunk) ahead of their use: a tile reads kTileRows rows n
// apart, more streams than the hardware prefetchers follow.
template <typename scalar_t>
ORTHOFT_ALWAYS_INLINE void prefetch_tile(const scalar_t* src, const Tiling& p, int64_t first, int64_t chunk) {
  constexpr int64_t line = 64 / sizeof(scalar_t);
  const int64_t last = std::min(p.rows, first + kTileRows);
  for (int64_t r = first; r < last; ++r) {
    const scalar_t* row = src + r * p.n + chunk * p.chunk;
    for (int64_t j = 0; j < p.chunk; j += line) __builtin_prefetch(row + j);
  }
}

template <typename scalar_t, typename acc>
ORTHOFT_ALWAYS_INLINE void store_tile(const acc* buf, const Tiling& p, int64_t first, int64_t rows,
                                      int64_t chunk, scalar_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* row = dst + (first + r) * p.n + chunk * p.chunk;
    for (int64_t j = 0; j < p.chunk; ++j) row[j] = static_cast<scalar_t>(buf[j * kTileRows + r]);
  }
}

// Columns c .. c + G of v @ R for one block: each loaded input vector feeds G independent accumulator
// chains. Column j goes to out at out_pos[j] when out_pos is given (the tile itself: every input is
// read before any column is stored), else at j (scratch).
template <typename acc, int64_t Bytes, int64_t G>
ORTHOFT_ALWAYS_INLINE void factor_columns(const simd_t<acc, Bytes>* tile, const int64_t* p, const acc* r, int64_t b,
                                          int64_t c, simd_t<acc, Bytes>* out, const int64_t* out_pos) {
  using V = simd_t<acc, Bytes>;
  constexpr int64_t lanes = kSimdPerColumn<acc, Bytes>;
  V sum[G][lanes] = {};
  for (int64_t t = 0; t < b; ++t) {
    const V* in = tile + p[t] * lanes;
    for (int64_t g = 0; g < G; ++g) {
      const acc w = r[t * b + c + g];
      for (int64_t l = 0; l < lanes; ++l) sum[g][l] += w * in[l];
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    V* column = out + (out_pos == nullptr ? c + g : out_pos[c + g]) * lanes;
    for (int64_t l = 0; l < lanes; ++l) column[l] = sum[g][l];
  }
}

// v <- v @ R for every block of B columns, all B in one group, straight back into the tile.
template <typename acc, int64_t Bytes, int64_t B>
ORTHOFT_ALWAYS_INLINE void whole_blocks(simd_t<acc, Bytes>* tile, const int64_t* pos, const acc* rot,
                                        int64_t blocks) {
  for (int64_t blk = 0; blk < blocks; ++blk) {
    factor_columns<acc, Bytes, B>(tile, pos + blk * B, rot + blk * B * B, B, 0, tile, pos + blk * B);
  }
}

// In place on a column-major tile: for each block, v <- v @ R, in groups of output columns that keep
// 8 (AVX2's 16 registers) or 16 (AVX-512's 32) accumulator vectors: a whole block where one group
// holds it, else through scratch.
template <typename acc, int64_t Bytes>
ORTHOFT_ALWAYS_INLINE void apply_factor(acc* buf, const int64_t* pos, const acc* rot, int64_t blocks,
                                        int64_t b, acc* scratch) {
  using V = simd_t<acc, Bytes>;
  constexpr int64_t lanes = kSimdPerColumn<acc, Bytes>;
  constexpr int64_t group = std::max<int64_t>(1, (Bytes == 64 ? 16 : 8) / lanes);
  V* tile = reinterpret_cast<V*>(buf);
  if (group >= 8 && b == 8) return whole_blocks<acc, Bytes, 8>(tile, pos, rot, blocks);
  if (group >= 4 && b == 4) return whole_blocks<acc, Bytes, 4>(tile, pos, rot, blocks);
  if (group >= 2 && b == 2) return whole_blocks<acc, Bytes, 2>(tile, pos, rot, blocks);
  V* out = reinterpret_cast<V*>(scratch);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t* p = pos + blk * b;
    const acc* r = rot + blk * b * b;
    int64_t c = 0;
    for (; c + group <= b; c += group) factor_columns<acc, Bytes, group>(tile, p, r, b, c, out, nullptr);
    for (; c < b; ++c) factor_columns<acc, Bytes, 1>(tile, p, r, b, c, out, nullptr);
    for (int64_t j = 0; j < b; ++j) {
      for (int64_t l = 0; l < lanes; ++l) tile[p[j] * lanes + l] = out[j * lanes + l];
    }
  }
}

// out[t][c] += the products of in column pt[t] and grad column pc[c] over the tile's rows, for a TB x CB
// patch of one block's entries (out's rows b apart), each entry one vector of partial sums: every
// loaded vector feeds TB or CB products.
template <typename acc, int64_t Bytes, int64_t TB, int64_t CB>
ORTHOFT_ALWAYS_INLINE void rotation_grad_patch(const simd_t<acc, Bytes>* x, const simd_t<acc, Bytes>* g,
                                               const int64_t* pt, const int64_t* pc, simd_t<acc, Bytes>* out,
                                               int64_t b) {
  using V = simd_t<acc, Bytes>;
  constexpr int64_t lanes = kSimdPerColumn<acc, Bytes>;
  V sum[TB][CB];
  for (int64_t t = 0; t < TB; ++t) {
    for (int64_t c = 0; c < CB; ++c) sum[t][c] = out[t * b + c];
  }
  for (int64_t l = 0; l < lanes; ++l) {
    V xv[TB];
    for (int64_t t = 0; t < TB; ++t) xv[t] = x[pt[t] * lanes + l];
    for (int64_t c = 0; c < CB; ++c) {
      const V gv = g[pc[c] * lanes + l];
      for (int64_t t = 0; t < TB; ++t) sum[t][c] += xv[t] * gv;
    }
  }
  for (int64_t t = 0; t < TB; ++t) {
    for (int64_t c = 0; c < CB; ++c) out[t * b + c] = sum[t][c];
  }
}

// One row of patches: columns c in steps of 4, then one at a time.
template <typename acc, int64_t Bytes, int64_t TB>
ORTHOFT_ALWAYS_INLINE void rotation_grad_rows(const simd_t<acc, Bytes>* x, const simd_t<acc, Bytes>* g,
                                              const int64_t* p, int64_t t, simd_t<acc, Bytes>* out, int64_t b) {
  int64_t c = 0;
  for (; c + 4 <= b; c += 4) rotation_grad_patch<acc, Bytes, TB, 4>(x, g, p + t, p + c, out + t * b + c, b);
  for (; c < b; ++c) rotation_grad_patch<acc, Bytes, TB, 1>(x, g, p + t, p + c, out + t * b + c, b);
}

// grad_lanes[blk, t, c] += in_block^T @ grad_block over the tile's rows, kept as one vector of
// partial sums per entry (padding rows are zero); reduce_lanes folds them once all tiles are done.
// Patches of 4 (AVX-512's 32 registers) or 2 rows by 4 columns.
template <typename acc, int64_t Bytes>
ORTHOFT_ALWAYS_INLINE void accumulate_rotation_grad(const acc* in, const acc* grad, const int64_t* pos,
                                                    int64_t blocks, int64_t b, acc* grad_lanes) {
  using V = simd_t<acc, Bytes>;
  constexpr int64_t patch_rows = Bytes == 64 ? 4 : 2;
  const V* x = reinterpret_cast<const V*>(in);
  const V* g = reinterpret_cast<const V*>(grad);
  V* out = reinterpret_cast<V*>(grad_lanes);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t* p = pos + blk * b;
    V* block_out = out + blk * b * b;
    int64_t t = 0;
    for (; t + patch_rows <= b; t += patch_rows) rotation_grad_rows<acc, Bytes, patch_rows>(x, g, p, t, block_out, b);
    for (; t < b; ++t) rotation_grad_rows<acc, Bytes, 1>(x, g, p, t, block_out, b);
  }
}

template <typename acc, int64_t Bytes>
ORTHOFT_ALWAYS_INLINE void reduce_lanes(const acc* grad_lanes, int64_t count, acc* grad_rot) {
  constexpr int64_t width = kSimdWidth<acc, Bytes>;
  for (int64_t i = 0; i < count; ++i) {
    acc total = 0;
    for (int64_t e = 0; e < width; ++e) total += grad_lanes[i * width + e];
    grad_rot[i] += total;
  }
}

template <typename scalar_t, typename acc>
struct ForwardArgs {
  const Tiling& p;
  const int64_t* positions;
  const acc* rot;
  const scalar_t* x;
  scalar_t* y;
};

template <int64_t Bytes, typename scalar_t, typename acc>
ORTHOFT_ALWAYS_INLINE void forward_items(const ForwardArgs<scalar_t, acc>& a, int64_t begin, int64_t end) {
  const Tiling& p = a.p;
  std::vector<acc> storage((p.chunk + p.b) * kTileRows);
  acc* buf = storage.data();
  acc* scratch = buf + p.chunk * kTileRows;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t chunk = item % p.chunks;
    const int64_t first = (item / p.chunks) * kTileRows;
    const int64_t rows = std::min(kTileRows, p.rows - first);
    if (item + 1 < end) prefetch_tile(a.x, p, ((item + 1) / p.chunks) * kTileRows, (item + 1) % p.chunks);
    load_tile(a.x, p, first, rows, chunk, buf);
    for (int64_t i = p.m - 1; i >= 0; --i) {
      apply_factor<acc, Bytes>(buf, a.positions + i * p.chunk,
                               a.rot + i * p.factor_stride() + chunk * p.chunk * p.b, p.blocks_per_chunk(), p.b,
                               scratch);
    }
    store_tile(buf, p, first, rows, chunk, a.y);
  }
}

template <typename scalar_t, typename acc>
struct BackwardArgs {
  const Tiling& p;
  const int64_t* positions;
  const acc* rot;
  const acc* rot_t;  // the rotations transposed, for the gradient of x
  const scalar_t* x;
  const scalar_t* grad;
  scalar_t* grad_x;  // null when not needed
  acc* partial;      // (parts, m, D, b, b), null when the rotations' gradient is not needed
  int64_t parts;
};

// Rows are split into `parts` interleaved sets of tiles, each summing into its own partial rotation
// gradient; item = (part, chunk). Without grad_x the last factor's transposed product and the store are
// skipped; without the rotations' gradient, so are the factor inputs and their outer products.
template <int64_t Bytes, typename scalar_t, typename acc>
ORTHOFT_ALWAYS_INLINE void backward_items(const BackwardArgs<scalar_t, acc>& a, int64_t begin, int64_t end) {
  const Tiling& p = a.p;
  const bool need_rot = a.partial != nullptr;
  const int64_t tile_size = p.chunk * kTileRows;
  // stages[i]: the input of factor i (stage m-1 is x); gbuf: the gradient flowing back.
  constexpr int64_t width = kSimdWidth<acc, Bytes>;
  const int64_t factor_entries = p.chunk * p.b;  // rotation entries of one factor inside a tile
  const int64_t num_stages = need_rot ? p.m : 0;
  std::vector<acc> storage((num_stages + 1) * tile_size + p.b * kTileRows);
  std::vector<acc> grad_lanes(need_rot ? p.m * factor_entries * width : 0);
  acc* stages = storage.data();
  acc* gbuf = stages + num_stages * tile_size;
  acc* scratch = gbuf + tile_size;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t part = item / p.chunks;
    const int64_t chunk = item % p.chunks;
    const acc* rot = a.rot + chunk * p.chunk * p.b;
    const acc* rot_t = a.rot_t + chunk * p.chunk * p.b;
    std::fill(grad_lanes.begin(), grad_lanes.end(), acc(0));
    for (int64_t tile = part; tile < p.tiles; tile += a.parts) {
      const int64_t first = tile * kTileRows;
      const int64_t rows = std::min(kTileRows, p.rows - first);
      if (tile + a.parts < p.tiles) {
        if (need_rot) prefetch_tile(a.x, p, first + a.parts * kTileRows, chunk);
        prefetch_tile(a.grad, p, first + a.parts * kTileRows, chunk);
      }
      if (need_rot) {
        load_tile(a.x, p, first, rows, chunk, stages + (p.m - 1) * tile_size);
        for (int64_t i = p.m - 1; i >= 1; --i) {
          acc* next = stages + (i - 1) * tile_size;
          std::copy_n(stages + i * tile_size, tile_size, next);
          apply_factor<acc, Bytes>(next, a.positions + i * p.chunk, rot + i * p.factor_stride(),
                                   p.blocks_per_chunk(), p.b, scratch);
        }
      }
      load_tile(a.grad, p, first, rows, chunk, gbuf);
      for (int64_t i = 0; i < p.m; ++i) {
        const int64_t* pos = a.positions + i * p.chunk;
        if (need_rot) {
          accumulate_rotation_grad<acc, Bytes>(stages + i * tile_size, gbuf, pos, p.blocks_per_chunk(), p.b,
                                               grad_lanes.data() + i * factor_entries * width);
        }
        if (i + 1 < p.m || a.grad_x != nullptr) {
          apply_factor<acc, Bytes>(gbuf, pos, rot_t + i * p.factor_stride(), p.blocks_per_chunk(), p.b, scratch);
        }
      }
      if (a.grad_x != nullptr) store_tile(gbuf, p, first, rows, chunk, a.grad_x);
    }
    if (need_rot) {
      acc* grad_rot = a.partial + part * p.m * p.factor_stride() + chunk * p.chunk * p.b;
      for (int64_t i = 0; i < p.m; ++i) {
        reduce_lanes<acc, Bytes>(grad_lanes.data() + i * factor_entries * width, factor_entries,
                                 grad_rot + i * p.factor_stride());
      }
    }
  }
}

template <typename scalar_t, typename acc>
void run_forward(const ForwardArgs<scalar_t, acc>& a, int64_t begin, int64_t end) {
  run_for_cpu([&](auto isa) ORTHOFT_INLINE_LAMBDA { forward_items<kVectorBytes<isa.isa>>(a, begin, end); });
}

template <typename scalar_t, typename acc>
void run_backward(const BackwardArgs<scalar_t, acc>& a, int64_t begin, int64_t end) {
  run_for_cpu([&](auto isa) ORTHOFT_INLINE_LAMBDA { backward_items<kVectorBytes<isa.isa>>(a, begin, end); });
}

// One factor of float blocks of 16 or more columns is a product of each block of columns with its
// rotation, which the tile loops (made for chains of small blocks) do slower: the block kernels take
// the block sizes block_kernel_takes, BLAS the others, (D, rows, b) @ (D, b, b) through torch's
// dispatcher (butterfly.h).
bool one_wide_factor(const Tensor& x, const Tensor& rotations, int64_t block_size) {
  return rotations.size(0) == 1 && block_size >= 16 && is_float_or_double(x);
}

Tensor to_acc_contiguous(const Tensor& t) {
  return torch::stable::contiguous(torch::stable::to(t, acc_dtype(t.scalar_type())));
}

}  // namespace

Tensor butterfly_cpu(const Tensor& x, const Tensor& rotations, int64_t block_size) {
  check_butterfly(x, rotations, block_size);
  STD_TORCH_CHECK(x.is_cpu(), "orthoft.ops.butterfly: the CPU kernel got x on another device");
  if (one_wide_factor(x, rotations, block_size)) {
    if (!block_kernel_takes(x, block_size)) return butterfly_by_matmul(x, rotations, block_size);
    return block_product(torch::stable::contiguous(x), to_acc_contiguous(rotations), block_size);
  }
  if (chunks_take(x, rotations, block_size, false)) return chunk_product(x, rotations, block_size);
  return tile_product(x, rotations, block_size);
}

Tensor tile_product(const Tensor& x, const Tensor& rotations, int64_t block_size) {
  const Tiling p(x, rotations, block_size);
  const Tensor in = torch::stable::contiguous(x);
  Tensor out = new_tensor(in, shape(in));
  const std::vector<int64_t> positions = butterfly_positions(p.b, p.m, p.chunk);
  const Tensor rot = to_acc_contiguous(rotations);

  ORTHOFT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "orthoft_butterfly_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const ForwardArgs<scalar_t, acc> args{p, positions.data(), rot.const_data_ptr<acc>(),
                                          in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>()};
    torch::stable::parallel_for(0, p.tiles * p.chunks, 1,
                                [&](int64_t begin, int64_t end) { run_forward(args, begin, end); });
  });
  return out;
}

std::tuple<Tensor, Tensor> butterfly_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& rotations,
                                                  int64_t block_size, std::vector<bool> output_mask) {
  check_butterfly_backward(grad, x, rotations, block_size, output_mask);
  STD_TORCH_CHECK(x.is_cpu(), "orthoft.ops.butterfly_backward: the CPU kernel got x on another device");
  if (one_wide_factor(x, rotations, block_size)) {
    if (!block_kernel_takes(x, block_size)) {
      return butterfly_backward_by_matmul(grad, x, rotations, block_size, output_mask);
    }
    // x's gradient by the block kernel with the transposed blocks; the rotations' gradient, x^T @ grad
    // per block, by its gradient kernel (in x's dtype, which is the rotations').
    const Tensor grad_rot =
        output_mask[1]
            ? torch::stable::reshape(
                  block_gradient(torch::stable::contiguous(x), torch::stable::contiguous(grad), block_size),
                  shape(rotations))
            : torch::stable::new_empty(rotations, {0});
    if (!output_mask[0]) return {torch::stable::new_empty(x, {0}), grad_rot};
    const Tensor rot_t = torch::stable::contiguous(torch::stable::transpose(to_acc_contiguous(rotations), -1, -2));
    return {block_product(torch::stable::contiguous(grad), rot_t, block_size), grad_rot};
  }
  if (chunks_take(x, rotations, block_size, true)) return chunk_backward(grad, x, rotations, block_size, output_mask);
  return tile_backward(grad, x, rotations, block_size, output_mask);
}

std::tuple<Tensor, Tensor> tile_backward(const Tensor& grad, const Tensor& x, const Tensor& rotations,
                                         int64_t block_size, const std::vector<bool>& output_mask) {
  const bool need_x = output_mask[0];
  const bool need_rot = output_mask[1];
  const Tiling p(x, rotations, block_size);
  const Tensor in = torch::stable::contiguous(x);
  const Tensor g = torch::stable::contiguous(grad);
  // A gradient not asked for is an empty tensor, as the operator's schema says.
  Tensor grad_x = new_tensor(in, need_x ? shape(in) : std::vector<int64_t>{0});
  Tensor grad_rot = new_tensor(rotations, need_rot ? shape(rotations) : std::vector<int64_t>{0});
  const std::vector<int64_t> positions = butterfly_positions(p.b, p.m, p.chunk);
  // Enough parts to keep every thread busy; summed at the end in a fixed order, so the result does
  // not depend on scheduling.
  const int64_t threads = torch::stable::get_num_threads();
  const int64_t parts = std::max<int64_t>(1, std::min(p.tiles, (2 * threads + p.chunks - 1) / p.chunks));
  const Tensor rot = to_acc_contiguous(rotations);
  const Tensor rot_t = torch::stable::contiguous(torch::stable::transpose(rot, -1, -2));
  const int64_t rot_numel = rotations.numel();

  ORTHOFT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "orthoft_butterfly_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    std::vector<acc> partial(need_rot ? parts * rot_numel : 0, acc(0));
    const BackwardArgs<scalar_t, acc> args{p,
                                           positions.data(),
                                           rot.const_data_ptr<acc>(),
                                           rot_t.const_data_ptr<acc>(),
                                           in.const_data_ptr<scalar_t>(),
                                           g.const_data_ptr<scalar_t>(),
                                           need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
                                           need_rot ? partial.data() : nullptr,
                                           parts};
    torch::stable::parallel_for(0, parts * p.chunks, 1,
                                [&](int64_t begin, int64_t end) { run_backward(args, begin, end); });
    if (need_rot) add_parts(partial.data(), parts, rot_numel, grad_rot.mutable_data_ptr<scalar_t>());
  });
  return {grad_x, grad_rot};
}

STABLE_TORCH_LIBRARY_IMPL(orthoft, CPU, m) {
  m.impl("butterfly", TORCH_BOX(&butterfly_cpu));
  m.impl("butterfly_backward", TORCH_BOX(&butterfly_backward_cpu));
}

}  // namespace orthoft
