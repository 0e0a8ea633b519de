// butterfly and its backward as batched matrix products through torch's dispatcher (see butterfly.h).
#include "butterfly.h"

namespace orthoft {
namespace {

using torch::stable::matmul;
using torch::stable::reshape;
using torch::stable::transpose;

// The blocks of factor i of y (rows, n) as (D, rows, b): with c = b * 2^i and h = b/2, column
// k*c + s*c/2 + d*h + u is entry s*h + u of block k * 2^i + d; factor 0 takes consecutive columns.
Tensor gather_blocks(const Tensor& y, int64_t b, int64_t i) {
  const int64_t rows = y.size(0), n = y.size(1);
  if (i == 0) return transpose(reshape(y, {rows, n / b, b}), 0, 1);
  const int64_t group = int64_t{1} << i;
  // (rows, K, 2, G, h) -> (K, G, rows, 2, h)
  const Tensor t = reshape(y, {rows, n / (b * group), 2, group, b / 2});
  return reshape(transpose(transpose(transpose(t, 0, 1), 1, 3), 2, 3), {n / b, rows, b});
}

// The inverse of gather_blocks: (D, rows, b) -> (rows, n).
Tensor scatter_blocks(const Tensor& blocks, int64_t b, int64_t i) {
  const int64_t rows = blocks.size(1), n = blocks.size(0) * b;
  if (i == 0) return reshape(transpose(blocks, 0, 1), {rows, n});
  const int64_t group = int64_t{1} << i;
  // (K, G, rows, 2, h) -> (rows, K, 2, G, h)
  const Tensor t = reshape(blocks, {n / (b * group), group, rows, 2, b / 2});
  return reshape(transpose(transpose(transpose(t, 2, 3), 1, 3), 0, 1), {rows, n});
}

// out = a @ b as batched matrices, written into out's storage whatever its strides.
void bmm_into(const Tensor& a, const Tensor& b, const Tensor& out) { call_aten("aten::bmm", "out", a, b, out); }

// y @ M_i, or y @ M_i^T for the gradient: rotations (m, D, b, b). Factor 0's blocks are column slices of
// y and of the result, so their products go straight into the result, without a copy in block order.
Tensor apply_factor(const Tensor& y, const Tensor& rotations, int64_t b, int64_t i, bool transposed) {
  Tensor r = torch::stable::select(rotations, 0, i);
  if (transposed) r = transpose(r, -1, -2);
  if (i == 0) {
    Tensor out = new_tensor(y, shape(y));
    bmm_into(gather_blocks(y, b, 0), r, gather_blocks(out, b, 0));
    return out;
  }
  return scatter_blocks(matmul(gather_blocks(y, b, i), r), b, i);
}

// t (..., n) as (rows, n) in the accumulation type.
Tensor acc_rows(const Tensor& t) {
  return reshape(torch::stable::to(t, acc_dtype(t.scalar_type())), {-1, t.size(-1)});
}

}  // namespace

Tensor butterfly_by_matmul(const Tensor& x, const Tensor& rotations, int64_t block_size) {
  const Tensor rot = torch::stable::to(rotations, acc_dtype(x.scalar_type()));
  Tensor y = acc_rows(x);
  for (int64_t i = rot.size(0) - 1; i >= 0; --i) y = apply_factor(y, rot, block_size, i, false);
  return result_like(y, x);
}

std::tuple<Tensor, Tensor> butterfly_backward_by_matmul(const Tensor& grad, const Tensor& x, const Tensor& rotations,
                                                        int64_t block_size, const std::vector<bool>& output_mask) {
  const bool need_x = output_mask[0], need_rot = output_mask[1];
  const Tensor rot = torch::stable::to(rotations, acc_dtype(x.scalar_type()));
  const int64_t m = rot.size(0);
  // inputs[i]: the input of factor i (x for the last one).
  std::vector<Tensor> inputs(m, acc_rows(x));
  if (need_rot) {
    for (int64_t i = m - 1; i >= 1; --i) inputs[i - 1] = apply_factor(inputs[i], rot, block_size, i, false);
  }
  Tensor grad_rot = torch::stable::new_empty(rotations, {need_rot ? m : 0, rot.size(1), block_size, block_size},
                                             rot.scalar_type());
  Tensor g = acc_rows(grad);
  for (int64_t i = 0; i < m; ++i) {
    if (need_rot) {
      bmm_into(transpose(gather_blocks(inputs[i], block_size, i), 1, 2), gather_blocks(g, block_size, i),
               torch::stable::select(grad_rot, 0, i));
    }
    if (i + 1 < m || need_x) g = apply_factor(g, rot, block_size, i, true);
  }
  return {need_x ? result_like(g, x) : torch::stable::new_empty(x, {0}),
          need_rot ? result_like(grad_rot, rotations) : torch::stable::new_empty(rotations, {0})};
}

}  // namespace orthoft
