// CPU kernels of cayley. Exact forward: R = 2 inv(I+S) - I, one matrix per task by elimination (by
// LAPACK's inverse above kMaxEliminationBlock), in the CPU's widest vectors (cpu_isa.h). Neumann series and both backwards: batched matrix
// products (cayley_matmul.cpp).
#include <algorithm>

#include "cayley.h"
#include "checks.h"
#include "small_matrix.h"

namespace orthoft {

Tensor cayley_cpu(const Tensor& skew, int64_t num_neumann_terms) {
  check_cayley(skew, num_neumann_terms);
  const int64_t n = skew.size(-1);
  if (num_neumann_terms > 0 || n > kMaxEliminationBlock) {
    return cayley_by_matmul(skew, num_neumann_terms);
  }
  const Tensor s = torch::stable::contiguous(skew);
  Tensor out = new_tensor(s, shape(s));
  const int64_t nn = n * n;

  ORTHOFT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "orthoft_cayley_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* src = s.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, s.numel() / nn, std::max<int64_t>(1, 256 / nn), [&](int64_t begin, int64_t end) {
      std::vector<acc> scratch(4 * nn);  // skew, inverse, and the n x 2n work
      acc* sk = scratch.data();
      acc* inverse = sk + nn;
      acc* work = inverse + nn;
      run_for_cpu([&](auto) ORTHOFT_INLINE_LAMBDA {
        for (int64_t i = begin; i < end; ++i) {
          std::copy(src + i * nn, src + (i + 1) * nn, sk);
          inverse_of_identity_plus(n, sk, work, inverse);
          for (int64_t j = 0; j < nn; ++j) inverse[j] *= acc(2);
          for (int64_t j = 0; j < nn; j += n + 1) inverse[j] -= acc(1);
          std::copy(inverse, inverse + nn, dst + i * nn);
        }
      });
    });
  });
  return out;
}

Tensor cayley_backward_cpu(const Tensor& grad, const Tensor& skew, const Tensor& rotation,
                           int64_t num_neumann_terms) {
  check_cayley_backward(grad, skew, rotation, num_neumann_terms);
  return cayley_backward_by_matmul(grad, skew, rotation, num_neumann_terms);
}

STABLE_TORCH_LIBRARY_IMPL(orthoft, CPU, m) {
  m.impl("cayley", TORCH_BOX(&cayley_cpu));
  m.impl("cayley_backward", TORCH_BOX(&cayley_backward_cpu));
}

}  // namespace orthoft
