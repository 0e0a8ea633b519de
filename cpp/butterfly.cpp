// CPU kernels of butterfly: y = x @ M_{m-1} ... M_0 and its backward, with permutations as index maps.
//
// Every factor mixes columns only inside chunks of C = b * 2^(m-1), so a task takes a tile of
// kRowsPerTile rows x C columns, stores it column-major in the accumulation type (so each update is
// a vectorisable loop over rows), applies all m factors in place and writes the tile once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"

namespace orthoft {
namespace {

constexpr int64_t kRowsPerTile = 32;

// positions[i * C + blk * b + t]: the column, inside a chunk of C, of element t of local block blk of
// factor i. Factor i splits the chunk into pieces of c = b * 2^i; block d of a piece takes b/2
// columns at d * b/2 and b/2 columns at c/2 + d * b/2 (factor 0: b contiguous columns).
std::vector<int64_t> butterfly_positions(int64_t b, int64_t m) {
  const int64_t chunk = b << (m - 1);
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

struct Tile {
  int64_t rows;   // rows in this tile (<= kRowsPerTile)
  int64_t first;  // first row
  int64_t chunk;  // chunk index along the columns
};

template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* src, int64_t n, int64_t c, const Tile& tile, acc_t* buf) {
  for (int64_t r = 0; r < tile.rows; ++r) {
    const scalar_t* row = src + (tile.first + r) * n + tile.chunk * c;
    for (int64_t j = 0; j < c; ++j) buf[j * kRowsPerTile + r] = static_cast<acc_t>(row[j]);
  }
}

template <typename scalar_t, typename acc_t>
void store_tile(const acc_t* buf, int64_t n, int64_t c, const Tile& tile, scalar_t* dst) {
  for (int64_t r = 0; r < tile.rows; ++r) {
    scalar_t* row = dst + (tile.first + r) * n + tile.chunk * c;
    for (int64_t j = 0; j < c; ++j) row[j] = static_cast<scalar_t>(buf[j * kRowsPerTile + r]);
  }
}

// In place on a column-major tile: for each block, v <- v @ R (or v @ R^T when transposed).
template <typename acc_t>
void apply_factor(acc_t* buf, const int64_t* pos, const acc_t* rot, int64_t blocks, int64_t b, bool transposed,
                  int64_t rows, acc_t* scratch) {
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t* p = pos + blk * b;
    const acc_t* r = rot + blk * b * b;
    for (int64_t c = 0; c < b; ++c) {
      acc_t* out = scratch + c * kRowsPerTile;
      for (int64_t row = 0; row < rows; ++row) out[row] = acc_t(0);
      for (int64_t t = 0; t < b; ++t) {
        const acc_t w = transposed ? r[c * b + t] : r[t * b + c];
        const acc_t* in = buf + p[t] * kRowsPerTile;
        for (int64_t row = 0; row < rows; ++row) out[row] += w * in[row];
      }
    }
    for (int64_t c = 0; c < b; ++c) {
      std::copy(scratch + c * kRowsPerTile, scratch + c * kRowsPerTile + rows, buf + p[c] * kRowsPerTile);
    }
  }
}

// grad_rot[blk] += in_block^T @ grad_block, summed over the tile's rows.
template <typename acc_t>
void accumulate_rotation_grad(const acc_t* in, const acc_t* grad, const int64_t* pos, int64_t blocks, int64_t b,
                              int64_t rows, acc_t* grad_rot) {
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t* p = pos + blk * b;
    acc_t* out = grad_rot + blk * b * b;
    for (int64_t t = 0; t < b; ++t) {
      const acc_t* a = in + p[t] * kRowsPerTile;
      for (int64_t c = 0; c < b; ++c) {
        const acc_t* g = grad + p[c] * kRowsPerTile;
        acc_t sum = 0;
        for (int64_t row = 0; row < rows; ++row) sum += a[row] * g[row];
        out[t * b + c] += sum;
      }
    }
  }
}

struct Layout {
  int64_t n, b, m, chunk, rows, tiles, chunks;
  Layout(const at::Tensor& x, const at::Tensor& rotations, int64_t block_size)
      : n(x.size(-1)), b(block_size), m(rotations.size(0)), chunk(block_size << (m - 1)) {
    rows = n == 0 ? 0 : x.numel() / n;
    tiles = (rows + kRowsPerTile - 1) / kRowsPerTile;
    chunks = n / chunk;
  }
  Tile tile(int64_t row_tile, int64_t chunk_index) const {
    const int64_t first = row_tile * kRowsPerTile;
    return {std::min(kRowsPerTile, rows - first), first, chunk_index};
  }
};

}  // namespace

at::Tensor butterfly_cpu(const at::Tensor& x, const at::Tensor& rotations, int64_t block_size) {
  check_butterfly(x, rotations, block_size);
  const Layout L(x, rotations, block_size);
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const std::vector<int64_t> positions = butterfly_positions(L.b, L.m);
  const int64_t blocks = L.chunk / L.b;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "orthoft_butterfly_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor rot = rotations.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* rot_ptr = rot.const_data_ptr<acc_t>();
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t rot_factor = L.n * L.b;  // elements of one factor's rotations
    at::parallel_for(0, L.tiles * L.chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(L.chunk * kRowsPerTile), scratch(L.b * kRowsPerTile);
      for (int64_t item = begin; item < end; ++item) {
        const Tile tile = L.tile(item / L.chunks, item % L.chunks);
        load_tile(src, L.n, L.chunk, tile, buf.data());
        for (int64_t i = L.m - 1; i >= 0; --i) {
          const acc_t* rot_chunk = rot_ptr + i * rot_factor + tile.chunk * L.chunk * L.b;
          apply_factor(buf.data(), positions.data() + i * L.chunk, rot_chunk, blocks, L.b, false, tile.rows,
                       scratch.data());
        }
        store_tile(buf.data(), L.n, L.chunk, tile, dst);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> butterfly_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& rotations, int64_t block_size) {
  check_butterfly_backward(grad, x, rotations, block_size);
  const Layout L(x, rotations, block_size);
  const at::Tensor in = x.contiguous();
  const at::Tensor g = grad.contiguous();
  at::Tensor grad_x = at::empty_like(in);
  const std::vector<int64_t> positions = butterfly_positions(L.b, L.m);
  const int64_t blocks = L.chunk / L.b;
  // Rows are split into `parts` interleaved sets of tiles, each with its own partial rotation gradient,
  // summed at the end in a fixed order: deterministic for any thread count.
  const int64_t parts =
      std::min(L.tiles, std::max<int64_t>(1, (2 * at::get_num_threads() + L.chunks - 1) / L.chunks));
  const auto acc_type = at::toOpMathType(in.scalar_type());
  at::Tensor partial = at::zeros({parts, L.m, L.n / L.b, L.b, L.b}, in.options().dtype(acc_type));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "orthoft_butterfly_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor rot = rotations.to(acc_type).contiguous();
    const acc_t* rot_ptr = rot.const_data_ptr<acc_t>();
    const scalar_t* x_ptr = in.const_data_ptr<scalar_t>();
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    scalar_t* dx_ptr = grad_x.mutable_data_ptr<scalar_t>();
    acc_t* partial_ptr = partial.mutable_data_ptr<acc_t>();
    const int64_t rot_factor = L.n * L.b;
    const int64_t tile_size = L.chunk * kRowsPerTile;
    at::parallel_for(0, parts * L.chunks, 1, [&](int64_t begin, int64_t end) {
      // stages[i]: the input of factor i (stage m-1 is x); gbuf: the gradient flowing back.
      std::vector<acc_t> stages(L.m * tile_size), gbuf(tile_size), scratch(L.b * kRowsPerTile);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t part = item / L.chunks;
        const int64_t chunk = item % L.chunks;
        acc_t* grad_rot = partial_ptr + part * L.m * rot_factor + chunk * L.chunk * L.b;
        for (int64_t row_tile = part; row_tile < L.tiles; row_tile += parts) {
          const Tile tile = L.tile(row_tile, chunk);
          load_tile(x_ptr, L.n, L.chunk, tile, stages.data() + (L.m - 1) * tile_size);
          for (int64_t i = L.m - 1; i >= 1; --i) {
            std::copy_n(stages.data() + i * tile_size, tile_size, stages.data() + (i - 1) * tile_size);
            apply_factor(stages.data() + (i - 1) * tile_size, positions.data() + i * L.chunk,
                         rot_ptr + i * rot_factor + chunk * L.chunk * L.b, blocks, L.b, false, tile.rows,
                         scratch.data());
          }
          load_tile(g_ptr, L.n, L.chunk, tile, gbuf.data());
          for (int64_t i = 0; i < L.m; ++i) {
            const int64_t* pos = positions.data() + i * L.chunk;
            accumulate_rotation_grad(stages.data() + i * tile_size, gbuf.data(), pos, blocks, L.b, tile.rows,
                                     grad_rot + i * rot_factor);
            apply_factor(gbuf.data(), pos, rot_ptr + i * rot_factor + chunk * L.chunk * L.b, blocks, L.b, true,
                         tile.rows, scratch.data());
          }
          store_tile(gbuf.data(), L.n, L.chunk, tile, dx_ptr);
        }
      }
    });
  });
  return {grad_x, partial.sum(0).to(rotations.scalar_type())};
}

TORCH_LIBRARY_IMPL(orthoft, CPU, m) {
  m.impl("butterfly", &butterfly_cpu);
  m.impl("butterfly_backward", &butterfly_backward_cpu);
}

}  // namespace orthoft
