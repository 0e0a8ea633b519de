// CPU kernels of cayley, block by block in the CPU's widest vectors (cpu_isa.h). Exact forward:
// R = 2 inv(I+S) - I by elimination (LAPACK's inverse above kMaxEliminationBlock). Neumann series and
// both backwards: cayley_block.h (batched matrix products, cayley_matmul.cpp, above
// kMaxCayleyBlockKernel).
#include <algorithm>
#include <type_traits>

#include "cayley.h"
#include "cayley_block.h"
#include "checks.h"
#include "small_matrix.h"

namespace orthoft {

namespace {

// out[i] = kernel(first[i], second[i]) for every n x n block i of first (and of second, when given, else
// the kernel's second block is unset), in the accumulation type: each block is copied into scratch,
// worked on there and copied out.
// kernel(bytes, n, first, second, out, scratch) gets the instruction set's vector width in bytes and
// scratch_matrices n x n matrices of scratch.
template <typename Kernel>
Tensor map_blocks(const Tensor& first, const Tensor* second, int64_t scratch_matrices, const Kernel& kernel) {
  const Tensor a = torch::stable::contiguous(first);
  const Tensor b = second == nullptr ? a : torch::stable::contiguous(*second);
  const bool has_second = second != nullptr;
  Tensor out = new_tensor(a, shape(a));
  const int64_t n = a.size(-1);
  const int64_t nn = n * n;
  if (nn == 0) return out;

  ORTHOFT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "orthoft_cayley_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* a_data = a.const_data_ptr<scalar_t>();
    const scalar_t* b_data = b.const_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, a.numel() / nn, std::max<int64_t>(1, 256 / nn), [&](int64_t begin, int64_t end) {
      std::vector<acc> storage((3 + scratch_matrices) * nn);
      acc* in_a = storage.data();
      acc* in_b = in_a + nn;
      acc* result = in_b + nn;
      acc* scratch = result + nn;
      run_for_cpu([&](auto isa) ORTHOFT_INLINE_LAMBDA {
        const std::integral_constant<int64_t, kVectorBytes<isa.isa>> bytes;
        for (int64_t i = begin; i < end; ++i) {
          std::copy(a_data + i * nn, a_data + (i + 1) * nn, in_a);
          if (has_second) std::copy(b_data + i * nn, b_data + (i + 1) * nn, in_b);
          kernel(bytes, n, in_a, in_b, result, scratch);
          std::copy(result, result + nn, out_data + i * nn);
        }
      });
    });
  });
  return out;
}

}  // namespace

Tensor cayley_cpu(const Tensor& skew, int64_t num_neumann_terms) {
  check_cayley(skew, num_neumann_terms);
  const int64_t n = skew.size(-1);
  if (num_neumann_terms > 0) {
    if (n > kMaxCayleyBlockKernel) return cayley_by_matmul(skew, num_neumann_terms);
    return map_blocks(skew, nullptr, block_scratch_matrices(num_neumann_terms),
                      [&](auto bytes, int64_t n, const auto* s, const auto*, auto* out, auto* scratch)
                          ORTHOFT_INLINE_LAMBDA {
                            neumann_block<decltype(bytes)::value>(n, num_neumann_terms, s, out, scratch);
                      });
  }
  if (n > kMaxEliminationBlock) return cayley_by_matmul(skew, num_neumann_terms);
  // R = 2 inv(I + S) - I
  return map_blocks(skew, nullptr, 2, [](auto, int64_t n, const auto* s, const auto*, auto* out, auto* work)
                                          ORTHOFT_INLINE_LAMBDA {
                                            using acc = std::remove_pointer_t<decltype(out)>;
                                            inverse_of_identity_plus(n, s, work, out);
                                            for (int64_t j = 0; j < n * n; ++j) out[j] *= acc(2);
                                            for (int64_t j = 0; j < n * n; j += n + 1) out[j] -= acc(1);
                                          });
}

Tensor cayley_backward_cpu(const Tensor& grad, const Tensor& skew, const Tensor& rotation,
                           int64_t num_neumann_terms) {
  check_cayley_backward(grad, skew, rotation, num_neumann_terms);
  if (grad.size(-1) > kMaxCayleyBlockKernel) {
    return cayley_backward_by_matmul(grad, skew, rotation, num_neumann_terms);
  }
  if (num_neumann_terms > 0) {
    return map_blocks(grad, &skew, block_scratch_matrices(num_neumann_terms),
                      [&](auto bytes, int64_t n, const auto* g, const auto* s, auto* ds, auto* scratch)
                          ORTHOFT_INLINE_LAMBDA {
                            neumann_block_backward<decltype(bytes)::value>(n, num_neumann_terms, s, g, ds, scratch);
                      });
  }
  return map_blocks(grad, &rotation, 2,
                    [](auto bytes, int64_t n, const auto* g, const auto* r, auto* ds, auto* scratch)
                        ORTHOFT_INLINE_LAMBDA { exact_block_backward<decltype(bytes)::value>(n, r, g, ds, scratch); });
}

STABLE_TORCH_LIBRARY_IMPL(orthoft, CPU, m) {
  m.impl("cayley", TORCH_BOX(&cayley_cpu));
  m.impl("cayley_backward", TORCH_BOX(&cayley_backward_cpu));
}

}  // namespace orthoft
