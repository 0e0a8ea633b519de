// Argument checks shared by the CPU and CUDA kernels of every orthoft operator. The Python wrappers
// (orthoft/_checks.py) make the same checks first and raise ValueError/TypeError; these are the
// safety net for direct calls of torch.ops.orthoft, and raise RuntimeError with the same message.
#pragma once

#include <ostream>

#include "common.h"

namespace orthoft {

// Prints a tensor's shape as [2, 3, 4].
struct PrintShape {
  const Tensor& t;
};
inline std::ostream& operator<<(std::ostream& os, const PrintShape& s) {
  os << '[';
  for (int64_t d = 0; d < s.t.dim(); ++d) os << (d ? ", " : "") << s.t.size(d);
  return os << ']';
}

inline void check_dtype(const Tensor& t, const char* op, const char* arg) {
  const ScalarType s = t.scalar_type();
  STD_TORCH_CHECK(s == ScalarType::Float || s == ScalarType::Double || s == ScalarType::Half ||
                      s == ScalarType::BFloat16,
                  "orthoft.ops.", op, ": ", arg, " must be float32, float64, float16 or bfloat16, got ", s);
}

inline void check_same(const Tensor& a, const char* arg_a, const Tensor& b, const char* arg_b, const char* op) {
  STD_TORCH_CHECK(a.scalar_type() == b.scalar_type(), "orthoft.ops.", op, ": ", arg_a, " and ", arg_b,
                  " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  STD_TORCH_CHECK(a.device() == b.device(), "orthoft.ops.", op, ": ", arg_a, " and ", arg_b,
                  " must be on the same device");
}

inline void check_square_blocks(const Tensor& t, const char* op, const char* arg, int64_t min_dim) {
  STD_TORCH_CHECK(t.dim() >= min_dim, "orthoft.ops.", op, ": ", arg, " must have at least ", min_dim,
                  " dimensions, got shape ", PrintShape{t});
  STD_TORCH_CHECK(t.size(-1) == t.size(-2) && t.size(-1) > 0, "orthoft.ops.", op, ": ", arg,
                  " must hold non-empty square blocks in its last two dimensions, got shape ", PrintShape{t});
}

// blocks: (..., D, b, b)
inline void check_block_diag(const Tensor& blocks) {
  check_dtype(blocks, "block_diag", "blocks");
  check_square_blocks(blocks, "block_diag", "blocks", 3);
}

// grad: (..., D*b, D*b) -> (..., D, b, b)
inline void check_block_diag_backward(const Tensor& grad, int64_t block_size) {
  check_dtype(grad, "block_diag_backward", "grad");
  check_square_blocks(grad, "block_diag_backward", "grad", 2);
  STD_TORCH_CHECK(block_size > 0 && grad.size(-1) % block_size == 0, "orthoft.ops.block_diag_backward: ",
                  "block_size must be a positive divisor of ", grad.size(-1), ", got ", block_size);
}

// skew: (..., b, b); the series length must fit the kernels' int.
inline void check_cayley(const Tensor& skew, int64_t num_neumann_terms) {
  check_dtype(skew, "cayley", "skew");
  check_square_blocks(skew, "cayley", "skew", 2);
  STD_TORCH_CHECK(num_neumann_terms >= 0 && num_neumann_terms < (int64_t{1} << 31) - 1,
                  "orthoft.ops.cayley: num_neumann_terms must be 0 (exact) or a positive number of series ",
                  "terms below 2^31 - 1, got ", num_neumann_terms);
}

inline void check_cayley_backward(const Tensor& grad, const Tensor& skew, const Tensor& rotation,
                                  int64_t num_neumann_terms) {
  check_cayley(skew, num_neumann_terms);
  check_same(grad, "grad", skew, "skew", "cayley_backward");
  check_same(rotation, "rotation", skew, "skew", "cayley_backward");
  STD_TORCH_CHECK(grad.sizes().equals(skew.sizes()) && rotation.sizes().equals(skew.sizes()),
                  "orthoft.ops.cayley_backward: grad, skew and rotation must have the same shape, got ",
                  PrintShape{grad}, ", ", PrintShape{skew}, " and ", PrintShape{rotation});
}

// x: (..., N), rotations: (m, N/b, b, b)
inline void check_butterfly(const Tensor& x, const Tensor& rotations, int64_t block_size) {
  check_dtype(x, "butterfly", "x");
  check_same(x, "x", rotations, "rotations", "butterfly");
  STD_TORCH_CHECK(x.dim() >= 1, "orthoft.ops.butterfly: x must have at least one dimension, got a scalar");
  STD_TORCH_CHECK(rotations.dim() == 4, "orthoft.ops.butterfly: rotations must have shape (m, N/b, b, b), got ",
                  PrintShape{rotations});
  const int64_t n = x.size(-1);
  const int64_t m = rotations.size(0);
  STD_TORCH_CHECK(block_size > 0 && n % block_size == 0, "orthoft.ops.butterfly: block_size must be a positive ",
                  "divisor of the last dimension of x (", n, "), got ", block_size);
  STD_TORCH_CHECK(rotations.size(1) == n / block_size && rotations.size(2) == block_size &&
                      rotations.size(3) == block_size,
                  "orthoft.ops.butterfly: rotations must have shape (m, ", n / block_size, ", ", block_size, ", ",
                  block_size, ") for x with last dimension ", n, " and block_size ", block_size, ", got ",
                  PrintShape{rotations});
  STD_TORCH_CHECK(m >= 1 && m <= 30, "orthoft.ops.butterfly: rotations must hold between 1 and 30 butterfly ",
                  "factors in its first dimension, got ", m);
  if (m > 1) {
    STD_TORCH_CHECK(block_size % 2 == 0, "orthoft.ops.butterfly: block_size must be even when there is more ",
                    "than one butterfly factor, got block_size ", block_size, " with ", m, " factors");
    const int64_t chunk = block_size << (m - 1);
    STD_TORCH_CHECK(n % chunk == 0, "orthoft.ops.butterfly: the last dimension of x (", n,
                    ") must be divisible by block_size * 2^(m-1) = ", chunk, " for block_size ", block_size,
                    " and ", m, " factors");
  }
}

// A backward operator's grad (the gradient of its forward's output, shaped like x) and its two flags.
inline void check_gradient_of_x(const Tensor& grad, const Tensor& x, const std::vector<bool>& output_mask,
                                const char* op) {
  check_same(grad, "grad", x, "x", op);
  STD_TORCH_CHECK(grad.sizes().equals(x.sizes()), "orthoft.ops.", op, ": grad must have the shape of x ",
                  PrintShape{x}, ", got ", PrintShape{grad});
  STD_TORCH_CHECK(output_mask.size() == 2, "orthoft.ops.", op, ": output_mask must hold two flags, got ",
                  output_mask.size());
}

inline void check_butterfly_backward(const Tensor& grad, const Tensor& x, const Tensor& rotations,
                                     int64_t block_size, const std::vector<bool>& output_mask) {
  check_butterfly(x, rotations, block_size);
  check_gradient_of_x(grad, x, output_mask, "butterfly_backward");
}

// x: (..., F, P), blocks: (D, C, C) with D * C = F
inline void check_channel_blocks(const Tensor& x, const Tensor& blocks) {
  check_dtype(x, "channel_blocks", "x");
  check_same(x, "x", blocks, "blocks", "channel_blocks");
  STD_TORCH_CHECK(x.dim() >= 2, "orthoft.ops.channel_blocks: x must have shape (..., F, P), got ", PrintShape{x});
  STD_TORCH_CHECK(blocks.dim() == 3, "orthoft.ops.channel_blocks: blocks must have shape (D, C, C), got ",
                  PrintShape{blocks});
  check_square_blocks(blocks, "channel_blocks", "blocks", 3);
  STD_TORCH_CHECK(blocks.size(0) * blocks.size(1) == x.size(-2), "orthoft.ops.channel_blocks: blocks (D, C, C) ",
                  "must split the F = ", x.size(-2), " channels of x into D chunks of C (D * C = F), got blocks ",
                  "of shape ", PrintShape{blocks});
}

inline void check_channel_blocks_backward(const Tensor& grad, const Tensor& x, const Tensor& blocks,
                                          const std::vector<bool>& output_mask) {
  check_channel_blocks(x, blocks);
  check_gradient_of_x(grad, x, output_mask, "channel_blocks_backward");
}

}  // namespace orthoft
