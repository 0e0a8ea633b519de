// Argument checks shared by the CPU and CUDA kernels of every orthoft operator.
// Each failure names the operator, the argument, the value and what would be valid.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace orthoft {

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_dtype(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(is_supported_dtype(t.scalar_type()), "orthoft.ops.", op, ": ", arg,
                   " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& a, const char* arg_a, const at::Tensor& b, const char* arg_b,
                       const char* op) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "orthoft.ops.", op, ": ", arg_a, " and ", arg_b,
                   " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.device() == b.device(), "orthoft.ops.", op, ": ", arg_a, " and ", arg_b,
                    " must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_square_blocks(const at::Tensor& t, const char* op, const char* arg, int64_t min_dim) {
  TORCH_CHECK_VALUE(t.dim() >= min_dim, "orthoft.ops.", op, ": ", arg, " must have at least ", min_dim,
                    " dimensions, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(-1) == t.size(-2) && t.size(-1) > 0, "orthoft.ops.", op, ": ", arg,
                    " must hold non-empty square blocks in its last two dimensions, got shape ", t.sizes());
}

// blocks: (..., D, b, b)
inline void check_block_diag(const at::Tensor& blocks) {
  check_dtype(blocks, "block_diag", "blocks");
  check_square_blocks(blocks, "block_diag", "blocks", 3);
}

// grad: (..., D*b, D*b) -> (..., D, b, b)
inline void check_block_diag_backward(const at::Tensor& grad, int64_t block_size) {
  check_dtype(grad, "block_diag_backward", "grad");
  check_square_blocks(grad, "block_diag_backward", "grad", 2);
  TORCH_CHECK_VALUE(block_size > 0 && grad.size(-1) % block_size == 0, "orthoft.ops.block_diag_backward: ",
                    "block_size must be a positive divisor of ", grad.size(-1), ", got ", block_size);
}

// skew: (..., b, b)
inline void check_cayley(const at::Tensor& skew, int64_t num_neumann_terms) {
  check_dtype(skew, "cayley", "skew");
  check_square_blocks(skew, "cayley", "skew", 2);
  TORCH_CHECK_VALUE(num_neumann_terms >= 0, "orthoft.ops.cayley: num_neumann_terms must be 0 (exact) or a ",
                    "positive number of series terms, got ", num_neumann_terms);
}

inline void check_cayley_backward(const at::Tensor& grad, const at::Tensor& skew, const at::Tensor& rotation,
                                  int64_t num_neumann_terms) {
  check_cayley(skew, num_neumann_terms);
  check_same(grad, "grad", skew, "skew", "cayley_backward");
  check_same(rotation, "rotation", skew, "skew", "cayley_backward");
  TORCH_CHECK_VALUE(grad.sizes() == skew.sizes() && rotation.sizes() == skew.sizes(),
                    "orthoft.ops.cayley_backward: grad, skew and rotation must have the same shape, got ",
                    grad.sizes(), ", ", skew.sizes(), " and ", rotation.sizes());
}

// x: (..., N), rotations: (m, N/b, b, b)
inline void check_butterfly(const at::Tensor& x, const at::Tensor& rotations, int64_t block_size) {
  const char* op = "butterfly";
  check_dtype(x, op, "x");
  check_same(x, "x", rotations, "rotations", op);
  TORCH_CHECK_VALUE(x.dim() >= 1, "orthoft.ops.butterfly: x must have at least one dimension, got a scalar");
  TORCH_CHECK_VALUE(rotations.dim() == 4, "orthoft.ops.butterfly: rotations must have shape (m, N/b, b, b), got ",
                    rotations.sizes());
  const int64_t n = x.size(-1);
  const int64_t m = rotations.size(0);
  TORCH_CHECK_VALUE(block_size > 0 && n % block_size == 0, "orthoft.ops.butterfly: block_size must be a positive ",
                    "divisor of the last dimension of x (", n, "), got ", block_size);
  TORCH_CHECK_VALUE(rotations.size(1) == n / block_size && rotations.size(2) == block_size &&
                        rotations.size(3) == block_size,
                    "orthoft.ops.butterfly: rotations must have shape (m, ", n / block_size, ", ", block_size, ", ",
                    block_size, ") for x with last dimension ", n, " and block_size ", block_size, ", got ",
                    rotations.sizes());
  TORCH_CHECK_VALUE(m >= 1 && m <= 30, "orthoft.ops.butterfly: rotations must hold between 1 and 30 butterfly ",
                    "factors in its first dimension, got ", m);
  if (m > 1) {
    TORCH_CHECK_VALUE(block_size % 2 == 0, "orthoft.ops.butterfly: block_size must be even when there is more than ",
                      "one butterfly factor, got block_size ", block_size, " with ", m, " factors");
    const int64_t chunk = block_size << (m - 1);
    TORCH_CHECK_VALUE(n % chunk == 0, "orthoft.ops.butterfly: the last dimension of x (", n,
                      ") must be divisible by block_size * 2^(m-1) = ", chunk, " for block_size ", block_size,
                      " and ", m, " factors");
  }
}

inline void check_butterfly_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& rotations,
                                     int64_t block_size) {
  check_butterfly(x, rotations, block_size);
  check_same(grad, "grad", x, "x", "butterfly_backward");
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "orthoft.ops.butterfly_backward: grad must have the shape of x ",
                    x.sizes(), ", got ", grad.sizes());
}

}  // namespace orthoft
