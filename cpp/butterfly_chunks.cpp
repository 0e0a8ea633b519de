// Butterfly factors as one factor of their dense chunks, on the CPU.
//
// m factors of b-blocks mix columns only inside chunks of C = b * 2^(m-1), so R is block diagonal in
// C x C chunks. Where the block kernels take C, x @ R by the chunks runs faster than the chain of
// factors in the tile kernels, though it costs C multiply-adds per entry instead of m * b (2048 x 1024,
// b = 8, forward and backward: m = 3 in 0.45x the time, m = 4 with AVX-512 in 0.65x). Chunks narrower
// than the kernels' panels go two or more together (b = 8, m = 1: forward 0.42x, with backward 0.74x).
// The chunks themselves are the tile kernels' product of a C-row matrix, so the path pays off from a
// few times C rows of x.
#include <algorithm>

#include "butterfly.h"

namespace orthoft {
namespace {

// Rows of x from which the chunks' own butterfly (C rows) is a small part of the call: 8 per chunk
// column. Forward needs no more (b = 8, 1024 columns: at 128 rows C = 16 took 0.82x the factors' time
// and one factor merged 0.82x; at 256 rows C = 32 0.63x). Backward pays the chunks' butterfly twice,
// so it takes at least 384 (C = 16 at 256 rows: 1.01-1.08x forward and backward, at 384 rows 0.85-0.88x;
// C = 64 at 512 rows 0.77x).
constexpr int64_t kRowsPerChunkRow = 8;
constexpr int64_t kMinChunkBackwardRows = 384;
// The tile kernels' backward of one factor is one pass, so merged chunks pay off there from more rows
// (1024 columns, b = 8, forward and backward: at 512 rows 1.04x the tiles' time, at 768 rows 0.96x).
constexpr int64_t kMinOneFactorBackwardRows = 768;

// Chunks narrower than this are taken together, as wider chunks of R, where they are narrower than the
// block kernels' panels.
constexpr int64_t kMergedChunkColumns = 16;

// The columns of the chunks x is multiplied by: C = b * 2^(m-1), or a few C-chunks together where the
// block kernels do not take C. R is block diagonal in any multiple of C that divides N.
int64_t chunk_size(const Tensor& x, const Tensor& rotations, int64_t block_size) {
  int64_t c = block_size << (rotations.size(0) - 1);
  while (!block_kernel_takes(x, c) && c < kMergedChunkColumns && x.size(-1) % (2 * c) == 0) c *= 2;
  return c;
}

template <typename T>
void fill_tiled_identity(Tensor& eye, int64_t c, int64_t n) {
  T* data = eye.mutable_data_ptr<T>();
  std::fill(data, data + c * n, T(0));
  for (int64_t r = 0; r < c; ++r) {
    for (int64_t col = r; col < n; col += c) data[r * n + col] = T(1);
  }
}

// The (C, N) matrix whose row r has a 1 in column r of every chunk: times R, its row r holds row r of
// every chunk.
Tensor tiled_identity(const Tensor& rotations, int64_t c, int64_t n) {
  Tensor eye = new_tensor(rotations, {c, n});
  ORTHOFT_DISPATCH_FLOAT_DOUBLE(eye.scalar_type(), "orthoft_tiled_identity",
                                [&] { fill_tiled_identity<scalar_t>(eye, c, n); });
  return eye;
}

// (C, N) with chunk j in columns j*C .. (j+1)*C <-> (N/C, C, C).
Tensor tiles_to_chunks(const Tensor& tiles, int64_t c) {
  const int64_t n = tiles.size(1);
  return torch::stable::contiguous(torch::stable::transpose(torch::stable::reshape(tiles, {c, n / c, c}), 0, 1));
}

Tensor chunks_to_tiles(const Tensor& chunks, int64_t c) {
  const int64_t n = chunks.size(0) * c;
  return torch::stable::reshape(torch::stable::contiguous(torch::stable::transpose(chunks, 0, 1)), {c, n});
}

}  // namespace

bool chunks_take(const Tensor& x, const Tensor& rotations, int64_t block_size, bool backward) {
  if (x.size(-1) == 0) return false;
  const int64_t c = chunk_size(x, rotations, block_size);
  const bool one_factor = rotations.size(0) == 1;
  // One factor of chunks as they are is the block kernels' own path.
  if (one_factor && c == block_size) return false;
  const int64_t rows = x.numel() / x.size(-1);
  const int64_t min_rows = !backward ? 0 : (one_factor ? kMinOneFactorBackwardRows : kMinChunkBackwardRows);
  return block_kernel_takes(x, c) && rows >= std::max(kRowsPerChunkRow * c, min_rows);
}

Tensor chunk_product(const Tensor& x, const Tensor& rotations, int64_t block_size) {
  const int64_t c = chunk_size(x, rotations, block_size);
  const Tensor tiles = tile_product(tiled_identity(rotations, c, x.size(-1)), rotations, block_size);
  return block_product(torch::stable::contiguous(x), tiles_to_chunks(tiles, c), c);
}

std::tuple<Tensor, Tensor> chunk_backward(const Tensor& grad, const Tensor& x, const Tensor& rotations,
                                          int64_t block_size, const std::vector<bool>& output_mask) {
  const int64_t c = chunk_size(x, rotations, block_size);
  const Tensor eye = tiled_identity(rotations, c, x.size(-1));
  const Tensor g = torch::stable::contiguous(grad);
  Tensor grad_x = torch::stable::new_empty(x, {0});
  Tensor grad_rot = torch::stable::new_empty(rotations, {0});
  if (output_mask[0]) {
    const Tensor chunks = tiles_to_chunks(tile_product(eye, rotations, block_size), c);
    grad_x = block_product(g, torch::stable::contiguous(torch::stable::transpose(chunks, -1, -2)), c);
  }
  if (output_mask[1]) {
    // The chunks' gradient, x^T @ grad per chunk, back through the chunks' own butterfly.
    const Tensor grad_tiles = chunks_to_tiles(block_gradient(torch::stable::contiguous(x), g, c), c);
    grad_rot = std::get<1>(tile_backward(grad_tiles, eye, rotations, block_size, {false, true}));
  }
  return {grad_x, grad_rot};
}

}  // namespace orthoft
