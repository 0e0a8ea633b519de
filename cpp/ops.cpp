// The operator schemas of the orthoft namespace. Kernels register per device in their own files.
#include "common.h"

STABLE_TORCH_LIBRARY(orthoft, m) {
  // (..., D, b, b) -> (..., D*b, D*b)
  m.def("block_diag(Tensor blocks) -> Tensor");
  // (..., D*b, D*b) -> (..., D, b, b): the diagonal blocks of grad
  m.def("block_diag_backward(Tensor grad, int block_size) -> Tensor");
  // (..., b, b) skew -> (..., b, b) rotations; 0 terms = exact Cayley, k > 0 = PEFT's Neumann series
  m.def("cayley(Tensor skew, int num_neumann_terms=0) -> Tensor");
  m.def("cayley_backward(Tensor grad, Tensor skew, Tensor rotation, int num_neumann_terms) -> Tensor");
  // x (..., N) @ M_{m-1} ... M_0 for rotations (m, N/b, b, b)
  m.def("butterfly(Tensor x, Tensor rotations, int block_size) -> Tensor");
  // (grad_x, grad_rotations); a gradient whose output_mask flag is false is not computed and comes back
  // as an empty tensor.
  m.def(
      "butterfly_backward(Tensor grad, Tensor x, Tensor rotations, int block_size, bool[2] output_mask) -> "
      "(Tensor, Tensor)");
  // x (..., F, P): at each of the P positions, the row of F channels @ blockdiag(blocks), blocks (F/C, C, C)
  m.def("channel_blocks(Tensor x, Tensor blocks) -> Tensor");
  m.def(
      "channel_blocks_backward(Tensor grad, Tensor x, Tensor blocks, bool[2] output_mask) -> (Tensor, Tensor)");
}
