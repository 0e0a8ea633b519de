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

Tensor scaled(const Tensor& x, double c) {
  if (c == 1.0) return x;
  return call_aten("aten::mul", "Tensor", x, torch::stable::full({}, c, x.scalar_type()));
}

// a I + b x for every matrix of the batch: one pass over x (the scale of I costs n x n).
Tensor identity_plus(const Tensor& x, const Tensor& eye, double a, double b) {
  return torch::stable::subtract(scaled(eye, a), x, -b);
}

// PEFT's series p(S) = sum_j c_j S^j in pairs of terms, p(S) = sum_i S2^i L_i with S2 = S S and
// L_i = c_2i I + c_(2i+1) S, by Horner's rule in S2: H_half = L_half, H_i = L_i + S2 H_(i+1), R = H_0.
// This takes about half the matrix products of Horner's rule in S (2 instead of 4 for k = 5). When
// the top degree is even, H_half = c_top I is kept as a scalar: no product with it.
struct NeumannPairs {
  int top;
  int half;
  Tensor s2;
  std::vector<Tensor> h;  // H_lowest .. H_half, H_half not formed when it is c_top I

  bool scalar_last() const { return top % 2 == 0; }
};

// Forms H_i for i >= lowest (the backward needs H_1 .. H_half only).
NeumannPairs neumann_pairs(const Tensor& s, const Tensor& eye, int64_t num_neumann_terms, int lowest) {
  const int top = neumann_top(num_neumann_terms);
  const int half = top / 2;
  NeumannPairs p{top, half, s, std::vector<Tensor>(half + 1, s)};
  if (half == 0) {
    p.h[0] = top == 0 ? identity_plus(torch::stable::new_zeros(s, shape(s)), eye, 1.0, 0.0)
                      : identity_plus(s, eye, series_coef(0, top), series_coef(1, top));
    return p;
  }
  p.s2 = matmul(s, s);
  if (!p.scalar_last()) {
    p.h[half] = identity_plus(s, eye, series_coef(2 * half, top), series_coef(2 * half + 1, top));
  }
  for (int i = half - 1; i >= lowest; --i) {
    const Tensor product =
        i + 1 == half && p.scalar_last() ? scaled(p.s2, series_coef(top, top)) : matmul(p.s2, p.h[i + 1]);
    const Tensor linear = identity_plus(s, eye, series_coef(2 * i, top), series_coef(2 * i + 1, top));
    p.h[i] = torch::stable::subtract(product, linear, -1.0);
  }
  return p;
}

// dS of R = p(S) for dR = g, back through neumann_pairs: dS2 += dH_i H_(i+1)^T, dH_(i+1) = S2^T dH_i,
// dS += c_(2i+1) dH_i, and at the end dS += dS2 S^T + S^T dS2. The terms c_(2i+1) dH_i are summed
// as lin_scale * lin, so that the scale costs no pass of its own.
Tensor neumann_pairs_backward(const Tensor& g, const Tensor& s, const Tensor& eye, int64_t num_neumann_terms) {
  const int top = neumann_top(num_neumann_terms);
  if (top < 2) return scaled(g, series_coef(1, top));
  const NeumannPairs p = neumann_pairs(s, eye, num_neumann_terms, 1);
  const double lin_scale = series_coef(1, top);
  Tensor lin = g;
  Tensor dh = g;
  Tensor ds2;
  for (int i = 0; i < p.half; ++i) {
    if (i > 0) lin = torch::stable::subtract(lin, dh, -series_coef(2 * i + 1, top) / lin_scale);
    const bool last = i + 1 == p.half;
    const Tensor term = last && p.scalar_last() ? scaled(dh, series_coef(top, top))
                                                : matmul(dh, transpose(p.h[i + 1], -1, -2));
    ds2 = i == 0 ? term : torch::stable::subtract(ds2, term, -1.0);
    if (!(last && p.scalar_last())) dh = matmul(transpose(p.s2, -1, -2), dh);
  }
  if (!p.scalar_last()) {
    lin = torch::stable::subtract(lin, dh, -series_coef(2 * p.half + 1, top) / lin_scale);
  }
  const Tensor st = transpose(s, -1, -2);
  const Tensor ds = torch::stable::subtract(matmul(ds2, st), lin, -lin_scale);
  return torch::stable::subtract(ds, matmul(st, ds2), -1.0);
}

Tensor like_input(const Tensor& result, const Tensor& input) {
  return torch::stable::reshape(torch::stable::to(result, input.scalar_type()), shape(input));
}

}  // namespace

Tensor cayley_by_matmul(const Tensor& skew, int64_t num_neumann_terms) {
  const Tensor s = acc_batch(skew);
  const Tensor eye = identity_like(s);
  if (num_neumann_terms > 0) {
    return like_input(neumann_pairs(s, eye, num_neumann_terms, 0).h[0], skew);
  }
  // R = 2 inv(I + S) - I
  const Tensor inverse = call_aten("aten::linalg_inv", "", identity_plus(s, eye, 1.0, 1.0));
  return like_input(identity_plus(inverse, eye, -1.0, 2.0), skew);
}

Tensor cayley_backward_by_matmul(const Tensor& grad, const Tensor& skew, const Tensor& rotation,
                                 int64_t num_neumann_terms) {
  Tensor g = acc_batch(grad);
  const Tensor eye = identity_like(g);
  Tensor ds;
  if (num_neumann_terms == 0) {
    // dS = -1/2 A^T G A^T with A = R + I = 2 inv(I + S).
    const Tensor at = transpose(identity_plus(acc_batch(rotation), eye, 1.0, 1.0), -1, -2);
    ds = scaled(matmul(at, matmul(g, at)), -0.5);
  } else {
    ds = neumann_pairs_backward(g, acc_batch(skew), eye, num_neumann_terms);
  }
  return like_input(ds, skew);
}

}  // namespace orthoft
