// CPU kernels of cayley: exact (R = 2 inv(I+S) - I, one matrix per task by elimination) and PEFT's
// Neumann series, forward and backward; the products run as batched BLAS calls. All in the
// accumulation type (float for half types).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "small_matrix.h"

namespace orthoft {
namespace {

template <typename scalar_t, typename F>
void for_each_matrix(int64_t count, int64_t n, int64_t scratch_matrices, const F& body) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, count, std::max<int64_t>(1, 256 / (n * n)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(scratch_matrices * n * n);
    for (int64_t i = begin; i < end; ++i) body(i, scratch.data());
  });
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void load(const scalar_t* src, int64_t size, acc_t* dst) {
  for (int64_t i = 0; i < size; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void store(const acc_t* src, int64_t size, scalar_t* dst) {
  for (int64_t i = 0; i < size; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

}  // namespace

// PEFT's series by Horner's rule, P_j = c_j I and P_t = S P_{t+1} + c_t I, as batched matrix
// products in the accumulation type; returns P_0 .. P_j (P_0 = R).
std::vector<at::Tensor> neumann_horner(const at::Tensor& skew, int64_t num_neumann_terms) {
  const std::vector<double> coeffs = neumann_coefficients(num_neumann_terms);
  const at::Tensor eye = at::eye(skew.size(-1), skew.options()).expand_as(skew);
  std::vector<at::Tensor> p(coeffs.size());
  p.back() = eye * coeffs.back();
  for (int64_t t = static_cast<int64_t>(coeffs.size()) - 2; t >= 0; --t) {
    p[t] = at::baddbmm(eye, skew, p[t + 1], coeffs[t], 1.0);
  }
  return p;
}

at::Tensor as_batch(const at::Tensor& t) {
  const int64_t n = t.size(-1);
  return t.reshape({-1, n, n}).to(at::toOpMathType(t.scalar_type()));
}

at::Tensor cayley_cpu(const at::Tensor& skew, int64_t num_neumann_terms) {
  check_cayley(skew, num_neumann_terms);
  if (num_neumann_terms > 0) {
    return neumann_horner(as_batch(skew), num_neumann_terms)[0].to(skew.scalar_type()).reshape(skew.sizes());
  }
  const at::Tensor s = skew.contiguous();
  at::Tensor out = at::empty_like(s);
  const int64_t n = s.size(-1);
  const int64_t nn = n * n;
  const int64_t count = s.numel() / nn;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "orthoft_cayley_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = s.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for_each_matrix<scalar_t>(count, n, 3, [&](int64_t i, acc_t* scratch) {
      acc_t* sk = scratch;
      acc_t* inverse = scratch + nn;
      acc_t* work = scratch + 2 * nn;
      load(src + i * nn, nn, sk);
      inverse_of_identity_plus(n, sk, work, inverse);
      // R = 2 inv(I+S) - I
      for (int64_t j = 0; j < nn; ++j) inverse[j] *= acc_t(2);
      for (int64_t j = 0; j < n; ++j) inverse[j * n + j] -= acc_t(1);
      store(inverse, nn, dst + i * nn);
    });
  });
  return out;
}

// Batched matrix products in the accumulation type.
at::Tensor cayley_backward_cpu(const at::Tensor& grad, const at::Tensor& skew, const at::Tensor& rotation,
                               int64_t num_neumann_terms) {
  check_cayley_backward(grad, skew, rotation, num_neumann_terms);
  at::Tensor g = as_batch(grad);
  at::Tensor ds;
  if (num_neumann_terms == 0) {
    // dS = -2 inv(I+S)^T G inv(I+S)^T with inv(I+S) = (R + I) / 2.
    const at::Tensor r = as_batch(rotation);
    const at::Tensor a = (r + at::eye(r.size(-1), r.options())).transpose(-1, -2);
    ds = at::bmm(a, at::bmm(g, a)).mul_(-0.5);
  } else {
    // Back through Horner's P_t = S P_{t+1} + c_t I: dS += dP_t P_{t+1}^T, dP_{t+1} = S^T dP_t.
    const at::Tensor s = as_batch(skew);
    const std::vector<at::Tensor> p = neumann_horner(s, num_neumann_terms);
    ds = at::zeros_like(s);
    for (size_t t = 0; t + 1 < p.size(); ++t) {
      ds.baddbmm_(g, p[t + 1].transpose(-1, -2));
      g = at::bmm(s.transpose(-1, -2), g);
    }
  }
  return ds.to(skew.scalar_type()).reshape(skew.sizes());
}

TORCH_LIBRARY_IMPL(orthoft, CPU, m) {
  m.impl("cayley", &cayley_cpu);
  m.impl("cayley_backward", &cayley_backward_cpu);
}

}  // namespace orthoft
