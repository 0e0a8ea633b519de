// CPU kernels of cayley: exact (R = 2 inv(I+S) - I) and PEFT's Neumann series, forward and backward.
// One matrix per task, in the accumulation type (float for half types).
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

at::Tensor cayley_cpu(const at::Tensor& skew, int64_t num_neumann_terms) {
  check_cayley(skew, num_neumann_terms);
  const at::Tensor s = skew.contiguous();
  at::Tensor out = at::empty_like(s);
  const int64_t n = s.size(-1);
  const int64_t nn = n * n;
  const int64_t count = s.numel() / nn;
  const std::vector<double> coeffs = neumann_coefficients(num_neumann_terms);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "orthoft_cayley_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = s.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for_each_matrix<scalar_t>(count, n, 4, [&](int64_t i, acc_t* scratch) {
      acc_t* sk = scratch;
      acc_t* a = scratch + nn;
      acc_t* b = scratch + 2 * nn;
      load(src + i * nn, nn, sk);
      if (num_neumann_terms == 0) {
        inverse_of_identity_plus(n, sk, b, a);
        for (int64_t j = 0; j < nn; ++j) a[j] *= acc_t(2);
        for (int64_t j = 0; j < n; ++j) a[j * n + j] -= acc_t(1);
      } else {
        // Horner: P = c_j I, then P = S P + c_t I for t = j-1 .. 0.
        for (int64_t j = 0; j < nn; ++j) a[j] = acc_t(0);
        for (int64_t j = 0; j < n; ++j) a[j * n + j] = acc_t(coeffs.back());
        for (int64_t t = static_cast<int64_t>(coeffs.size()) - 2; t >= 0; --t) {
          small_matmul(n, sk, false, a, false, acc_t(1), b);
          for (int64_t j = 0; j < n; ++j) b[j * n + j] += acc_t(coeffs[t]);
          std::swap(a, b);
        }
      }
      store(a, nn, dst + i * nn);
    });
  });
  return out;
}

at::Tensor cayley_backward_cpu(const at::Tensor& grad, const at::Tensor& skew, const at::Tensor& rotation,
                               int64_t num_neumann_terms) {
  check_cayley_backward(grad, skew, rotation, num_neumann_terms);
  const at::Tensor g = grad.contiguous();
  const at::Tensor s = skew.contiguous();
  const at::Tensor r = rotation.contiguous();
  at::Tensor out = at::empty_like(s);
  const int64_t n = s.size(-1);
  const int64_t nn = n * n;
  const int64_t count = s.numel() / nn;
  const std::vector<double> coeffs = neumann_coefficients(num_neumann_terms);
  const int64_t degree = static_cast<int64_t>(coeffs.size()) - 1;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "orthoft_cayley_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    const scalar_t* s_ptr = s.const_data_ptr<scalar_t>();
    const scalar_t* r_ptr = r.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for_each_matrix<scalar_t>(count, n, degree + 6, [&](int64_t i, acc_t* scratch) {
      acc_t* gm = scratch;
      acc_t* tmp = scratch + nn;
      acc_t* ds = scratch + 2 * nn;
      acc_t* a = scratch + 3 * nn;
      load(g_ptr + i * nn, nn, gm);
      if (num_neumann_terms == 0) {
        // dS = -2 inv(I+S)^T G inv(I+S)^T with inv(I+S) = (R + I) / 2.
        load(r_ptr + i * nn, nn, a);
        for (int64_t j = 0; j < n; ++j) a[j * n + j] += acc_t(1);
        small_matmul(n, gm, false, a, true, acc_t(1), tmp);
        small_matmul(n, a, true, tmp, false, acc_t(-0.5), ds);
      } else {
        // Back through Horner's P_t = S P_{t+1} + c_t I: dS += dP_t P_{t+1}^T, dP_{t+1} = S^T dP_t.
        acc_t* sk = scratch + 4 * nn;
        acc_t* powers = scratch + 5 * nn;  // P_1 .. P_degree
        load(s_ptr + i * nn, nn, sk);
        acc_t* last = powers + (degree - 1) * nn;
        for (int64_t j = 0; j < nn && degree > 0; ++j) last[j] = acc_t(0);
        for (int64_t j = 0; j < n && degree > 0; ++j) last[j * n + j] = acc_t(coeffs.back());
        for (int64_t t = degree - 2; t >= 0; --t) {
          small_matmul(n, sk, false, powers + (t + 1) * nn, false, acc_t(1), powers + t * nn);
          for (int64_t j = 0; j < n; ++j) powers[t * nn + j * n + j] += acc_t(coeffs[t + 1]);
        }
        for (int64_t j = 0; j < nn; ++j) ds[j] = acc_t(0);
        for (int64_t t = 0; t < degree; ++t) {
          small_matmul(n, gm, false, powers + t * nn, true, acc_t(1), tmp);
          for (int64_t j = 0; j < nn; ++j) ds[j] += tmp[j];
          small_matmul(n, sk, true, gm, false, acc_t(1), tmp);
          std::swap(gm, tmp);
        }
      }
      store(ds, nn, dst + i * nn);
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(orthoft, CPU, m) {
  m.impl("cayley", &cayley_cpu);
  m.impl("cayley_backward", &cayley_backward_cpu);
}

}  // namespace orthoft
