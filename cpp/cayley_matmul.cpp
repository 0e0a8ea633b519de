// cayley and its backward as batched matrix products through torch's dispatcher (see cayley.h).
#include <optional>

#include "cayley.h"

namespace orthoft {
namespace {

using torch::stable::matmul;
using torch::stable::transpose;

// t as a (count, n, n) batch in the accumulation type.
Tensor acc_batch(const Tensor& t) {
  const int64_t n = t.size(-1);
  return torch::stable::reshape(torch::stable::to(t, acc_dtype(t.scalar_type())), {-1, n, n});
}

Tensor identity_like(const Tensor& t) {
  return call_aten("aten::eye", "", t.size(-1), std::optional<ScalarType>(t.scalar_type()),
                   std::optional<torch::headeronly::Layout>(), std::optional<torch::stable::Device>(t.device()),
                   std::optional<bool>());
}

// x + c I for every matrix of the batch.
Tensor plus_identity(const Tensor& x, const Tensor& eye, double c) { return torch::stable::subtract(x, eye, -c); }

Tensor scaled(const Tensor& x, double c) {
  return call_aten("aten::mul", "Tensor", x, torch::stable::full({}, c, x.scalar_type()));
}

// PEFT's series by Horner's rule, P_top = c_top I and P_t = S P_(t+1) + c_t I; returns P_0 .. P_top
// (P_0 = R).
std::vector<Tensor> neumann_horner(const Tensor& s, const Tensor& eye, int64_t num_neumann_terms) {
  const int top = neumann_top(num_neumann_terms);
  std::vector<Tensor> p(top + 1, s);
  p[top] = plus_identity(torch::stable::new_zeros(s, shape(s)), eye, neumann_coef(top, top));
  for (int t = top - 1; t >= 0; --t) {
    p[t] = plus_identity(matmul(s, p[t + 1]), eye, neumann_coef(t, top));
  }
  return p;
}

Tensor like_input(const Tensor& result, const Tensor& input) {
  return torch::stable::reshape(torch::stable::to(result, input.scalar_type()), shape(input));
}

}  // namespace

Tensor cayley_by_matmul(const Tensor& skew, int64_t num_neumann_terms) {
  const Tensor s = acc_batch(skew);
  const Tensor eye = identity_like(s);
  if (num_neumann_terms > 0) {
    return like_input(neumann_horner(s, eye, num_neumann_terms)[0], skew);
  }
  // R = 2 inv(I + S) - I
  const Tensor inverse = call_aten("aten::linalg_inv", "", plus_identity(s, eye, 1.0));
  return like_input(plus_identity(scaled(inverse, 2.0), eye, -1.0), skew);
}

Tensor cayley_backward_by_matmul(const Tensor& grad, const Tensor& skew, const Tensor& rotation,
                                 int64_t num_neumann_terms) {
  Tensor g = acc_batch(grad);
  const Tensor eye = identity_like(g);
  Tensor ds;
  if (num_neumann_terms == 0) {
    // dS = -1/2 A^T G A^T with A = R + I = 2 inv(I + S).
    const Tensor at = transpose(plus_identity(acc_batch(rotation), eye, 1.0), -1, -2);
    ds = scaled(matmul(at, matmul(g, at)), -0.5);
  } else {
    // Back through Horner's P_t = S P_(t+1) + c_t I: dS += dP_t P_(t+1)^T, dP_(t+1) = S^T dP_t.
    const Tensor s = acc_batch(skew);
    const std::vector<Tensor> p = neumann_horner(s, eye, num_neumann_terms);
    ds = torch::stable::new_zeros(s, shape(s));
    for (size_t t = 0; t + 1 < p.size(); ++t) {
      ds = torch::stable::subtract(ds, matmul(g, transpose(p[t + 1], -1, -2)), -1.0);
      g = matmul(transpose(s, -1, -2), g);
    }
  }
  return like_input(ds, skew);
}

}  // namespace orthoft
