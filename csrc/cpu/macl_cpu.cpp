// Fused CPU kernels for the contrastive primitive (backend "cpu"), SPEC.md sections 3-6.
//
// Per anchor row a (anchors A [M, D], candidates C [K, D], both L2-normalised):
//
//   S = A C^T,   l_ak = b_a S_ak  (scaled map)   or   c artanh(clamp(S_ak, -1 + e, 1 - e))
//   Neg(a) = every k but pos[a] and self[a]
//   forward:  lse_neg[a] = log sum_{k in Neg(a)} exp(l_ak)          (online max/sum over tiles)
//   backward: G_ak = g_a exp(l_ak - lse_neg[a]) on Neg(a), 0 elsewhere
//             H_ak = G_ak * dl/dS_ak  (b_a, or c / (1 - S^2) inside the clamp, 0 outside)
//             dA = H C,   dC = H^T A,   db_a = sum_k G_ak S_ak
//
// The M x K matrix is never formed: the work is a list of BLOCK x BLOCK tiles spread over
// threads with at::parallel_for (OpenMP in PyTorch's CPU build). Each tile's S comes from one
// BLAS GEMM (at::mm), its exponentials from a branch-free polynomial exp that the compiler
// vectorises, and the gradient GEMMs of backward accumulate into per-thread buffers summed at
// the end (no atomics; for a given thread count the result is bitwise reproducible).
//
// Symmetric mode (layout 2n on one process: A is C): S is symmetric, so only the tiles (i, j)
// with j >= i are computed. An off-diagonal tile serves the anchors of block i (its rows,
// logits b_a S_ak) and those of block j (its columns, logits b_k S_ak); in backward both sides
// land in one H_ij = H_row + H_col^T, and dU_i += H_ij U_j, dU_j += H_ij^T U_i: half the GEMM
// work of the plain tiling. A diagonal tile already holds every pair of its block as a row.
//
// Passes and GEMM work (M anchors, K candidates, D columns): forward 1 pass, M K D multiply-adds
// (symmetric: about half); backward 1 pass, 3 M K D (symmetric: about half).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// 256 x 256 tiles: one GEMM of 256 x 256 x D per tile keeps at::mm's call overhead small, and
// a tile's S plus its logits (2 x 256 KiB in fp32) stay in this machine's 512 KiB L2.
constexpr int64_t BLOCK = 256;

// exp for float: 2^(x log2 e) = 2^n 2^f with |f| <= 1/2, 2^f by a degree-6 polynomial
// (relative error ~2 ulp, far inside SPEC's 1e-5). Written so that loops over it vectorise
// (checked with perf: the first version, with nearbyint and memcpy bit casts, ran scalar):
// round-to-nearest by the 1.5 * 2^23 trick (exact without -ffast-math, which we do not use:
// it would also assume away the infinities that mark excluded pairs), bit casts by
// std::bit_cast, and selects instead of branches. exp(x) = 0 for x < -87.3, x = -inf included.
inline float exp_approx(float x) {
  const float lo = -87.3f, hi = 88.7f;
  const float clamped = x < lo ? lo : (x > hi ? hi : x);
  const float t = clamped * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;
  const float f = t - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = std::bit_cast<int32_t>(p) + (static_cast<int32_t>(n) << 23);
  const float result = std::bit_cast<float>(bits);
  return x < lo ? 0.0f : result;
}

inline double exp_approx(double x) { return std::exp(x); }  // float64 keeps libm's exp

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

struct Problem {
  int64_t M, K, D;
  bool scaled;    // l = b_a S, else c artanh(clamp(S, -1 + eps, 1 - eps))
  double c, eps;  // the artanh map's scale and clamp
  bool symmetric;
  const int64_t* pos;
  const int64_t* self;  // nullptr: no self among the candidates

  int64_t blocks_m() const { return (M + BLOCK - 1) / BLOCK; }
  int64_t blocks_k() const { return (K + BLOCK - 1) / BLOCK; }

  // The tiles to compute: every (i, j), or j >= i in symmetric mode.
  std::vector<std::pair<int64_t, int64_t>> tiles() const {
    std::vector<std::pair<int64_t, int64_t>> out;
    for (int64_t i = 0; i < blocks_m(); ++i)
      for (int64_t j = symmetric ? i : 0; j < blocks_k(); ++j) out.emplace_back(i, j);
    return out;
  }
};

// A tile: rows r0..r0+bm of A against rows k0..k0+bn of C, with S = A_r C_k^T.
struct Tile {
  int64_t i, j, r0, k0, bm, bn;
  bool mirrored;  // symmetric off-diagonal: the columns are anchors too
};

Tile make_tile(const Problem& p, int64_t i, int64_t j) {
  const int64_t r0 = i * BLOCK, k0 = j * BLOCK;
  return {i, j, r0, k0, std::min(BLOCK, p.M - r0), std::min(BLOCK, p.K - k0),
          p.symmetric && j != i};
}

// dl/dS of the artanh map: 1 / (1 - S^2) inside the clamp, 0 outside (finite at S = +-1).
template <typename T>
inline T artanh_slope(T s, T c, T eps) {
  return std::abs(s) < T(1) - eps ? c / std::max(T(1) - s * s, eps) : T(0);
}

// The logits of one side of a tile, laid out like S (L[r * bn + k] pairs row r0 + r with
// column k0 + k). Row side: anchor r0 + r, logit b_a S. Column side: anchor k0 + k against
// candidate r0 + r, logit b_k S. Excluded pairs (positive, self) are -inf.
template <typename T>
void side_logits(const Problem& p, const Tile& t, const T* S, const T* artanh_S,
                 const T* inv_temp, bool column_side, T* L) {
  for (int64_t r = 0; r < t.bm; ++r) {
    const T* s = S + r * t.bn;
    T* l = L + r * t.bn;
    if (!p.scaled) {
      std::memcpy(l, artanh_S + r * t.bn, sizeof(T) * t.bn);
    } else if (column_side) {
      const T* b = inv_temp + t.k0;
#pragma omp simd
      for (int64_t k = 0; k < t.bn; ++k) l[k] = b[k] * s[k];
    } else {
      const T b = inv_temp[t.r0 + r];
#pragma omp simd
      for (int64_t k = 0; k < t.bn; ++k) l[k] = b * s[k];
    }
  }
  auto exclude = [&](int64_t anchor, int64_t candidate) {
    const int64_t r = (column_side ? candidate : anchor) - t.r0;
    const int64_t k = (column_side ? anchor : candidate) - t.k0;
    if (r >= 0 && r < t.bm && k >= 0 && k < t.bn) L[r * t.bn + k] = neg_inf<T>();
  };
  const int64_t first = column_side ? t.k0 : t.r0;
  const int64_t count = column_side ? t.bn : t.bm;
  for (int64_t a = first; a < first + count; ++a) {
    exclude(a, p.pos[a]);
    if (p.self) exclude(a, p.self[a]);
  }
}

template <typename T>
void artanh_logits(const Problem& p, const T* S, int64_t n, T* out) {
  const T c = T(p.c), lo = T(-1) + T(p.eps), hi = T(1) - T(p.eps);
  for (int64_t q = 0; q < n; ++q) out[q] = c * std::atanh(std::min(std::max(S[q], lo), hi));
}

// S = A_r C_k^T for one tile, by BLAS, into the calling thread's buffer (laid out [bm, bn]).
// Writing into a reused buffer matters: a fresh 256 KiB tensor per tile sits between glibc's
// mmap threshold and its heap, and thousands of them grew the peak RSS by hundreds of MiB.
template <typename T>
const T* tile_similarity(const at::Tensor& A_r, const at::Tensor& C_k, std::vector<T>& buf) {
  at::Tensor out = at::from_blob(buf.data(), {A_r.size(0), C_k.size(0)}, A_r.options());
  at::mm_out(out, A_r, C_k.t());
  return buf.data();
}

// Per-thread online log-sum-exp state for every anchor: running max and the sum of
// exp(l - max).
template <typename T>
struct OnlineLse {
  std::vector<T> max, sum;
  explicit OnlineLse(int64_t m) : max(m, neg_inf<T>()), sum(m, T(0)) {}
  void merge(int64_t a, T m, T s) {  // a partial (m, s) with terms exp(l - m)
    if (m == neg_inf<T>()) return;
    const T new_max = std::max(max[a], m);
    sum[a] = sum[a] * std::exp(max[a] - new_max) + s * std::exp(m - new_max);
    max[a] = new_max;
  }
};

template <typename T>
at::Tensor forward_impl(const Problem& p, const at::Tensor& A, const at::Tensor& C,
                        const T* inv_temp) {
  const auto tiles = p.tiles();
  std::vector<OnlineLse<T>> states(at::get_num_threads(), OnlineLse<T>(p.M));
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    OnlineLse<T>& state = states[at::get_thread_num()];
    std::vector<T> S_buf(BLOCK * BLOCK), L(BLOCK * BLOCK), artanh_S(p.scaled ? 0 : BLOCK * BLOCK);
    std::vector<T> col_max(BLOCK), col_sum(BLOCK);
    for (int64_t q = begin; q < end; ++q) {
      const Tile t = make_tile(p, tiles[q].first, tiles[q].second);
      const T* S = tile_similarity(A.narrow(0, t.r0, t.bm), C.narrow(0, t.k0, t.bn), S_buf);
      if (!p.scaled) artanh_logits(p, S, t.bm * t.bn, artanh_S.data());

      side_logits(p, t, S, artanh_S.data(), inv_temp, false, L.data());
      for (int64_t r = 0; r < t.bm; ++r) {
        const T* l = L.data() + r * t.bn;
        T m = neg_inf<T>();
#pragma omp simd reduction(max : m)
        for (int64_t k = 0; k < t.bn; ++k) m = l[k] > m ? l[k] : m;
        if (m == neg_inf<T>()) continue;  // every candidate of this tile excluded
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < t.bn; ++k) s += exp_approx(l[k] - m);
        state.merge(t.r0 + r, m, s);
      }
      if (!t.mirrored) continue;

      side_logits(p, t, S, artanh_S.data(), inv_temp, true, L.data());
      std::fill(col_max.begin(), col_max.end(), neg_inf<T>());
      for (int64_t r = 0; r < t.bm; ++r) {
        const T* l = L.data() + r * t.bn;
        T* cm = col_max.data();
#pragma omp simd
        for (int64_t k = 0; k < t.bn; ++k) cm[k] = l[k] > cm[k] ? l[k] : cm[k];
      }
      // A column whose candidates are all excluded has max -inf: shift by 0 there (its terms
      // are exp(-inf) = 0 either way), never by -inf (which would give NaN).
      for (int64_t k = 0; k < t.bn; ++k)
        if (col_max[k] == neg_inf<T>()) col_max[k] = T(0);
      std::fill(col_sum.begin(), col_sum.end(), T(0));
      for (int64_t r = 0; r < t.bm; ++r) {
        const T* l = L.data() + r * t.bn;
        T* cs = col_sum.data();
        const T* cm = col_max.data();
#pragma omp simd
        for (int64_t k = 0; k < t.bn; ++k) cs[k] += exp_approx(l[k] - cm[k]);
      }
      for (int64_t k = 0; k < t.bn; ++k)
        if (col_sum[k] > T(0)) state.merge(t.k0 + k, col_max[k], col_sum[k]);
    }
  });
  at::Tensor lse = at::empty({p.M}, A.options());
  T* out = lse.data_ptr<T>();
  at::parallel_for(0, p.M, 2048, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      T m = neg_inf<T>();
      for (const auto& st : states) m = std::max(m, st.max[a]);
      T s = 0;
      for (const auto& st : states)
        if (st.max[a] != neg_inf<T>()) s += st.sum[a] * std::exp(st.max[a] - m);
      out[a] = m + std::log(s);  // -inf for an anchor without negatives (callers forbid it)
    }
  });
  return lse;
}

// G = g_a exp(l - lse_a) in place over the logits L of one side (rows: anchor index r0 + r;
// columns: anchor index k0 + k), accumulating db = sum G S per anchor when asked.
template <typename T>
void side_gradient(const Tile& t, bool column_side, const T* S, const T* lse, const T* grad_lse,
                   T* L, T* grad_inv_temp) {
  for (int64_t r = 0; r < t.bm; ++r) {
    T* l = L + r * t.bn;
    const T* s = S + r * t.bn;
    if (column_side) {
      const T* lse_k = lse + t.k0;
      const T* g_k = grad_lse + t.k0;
#pragma omp simd
      for (int64_t k = 0; k < t.bn; ++k) l[k] = g_k[k] * exp_approx(l[k] - lse_k[k]);
      if (grad_inv_temp) {
        T* db = grad_inv_temp + t.k0;
        for (int64_t k = 0; k < t.bn; ++k) db[k] += l[k] * s[k];
      }
    } else {
      const T lse_a = lse[t.r0 + r], g_a = grad_lse[t.r0 + r];
#pragma omp simd
      for (int64_t k = 0; k < t.bn; ++k) l[k] = g_a * exp_approx(l[k] - lse_a);
      if (grad_inv_temp) {
        T db = 0;
#pragma omp simd reduction(+ : db)
        for (int64_t k = 0; k < t.bn; ++k) db += l[k] * s[k];
        grad_inv_temp[t.r0 + r] += db;
      }
    }
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const Problem& p, const at::Tensor& A, const at::Tensor& C, const T* inv_temp, const T* lse,
    const T* grad_lse, bool need_a, bool need_c, bool need_b) {
  const auto tiles = p.tiles();
  const int num_threads = at::get_num_threads();
  // Per-thread accumulators: dA (symmetric: dU), dC, db. Summed over threads at the end.
  std::vector<at::Tensor> dA(num_threads), dC(num_threads);
  std::vector<std::vector<T>> db(num_threads);
  for (int th = 0; th < num_threads; ++th) {
    dA[th] = at::zeros({p.M, p.D}, A.options());
    if (!p.symmetric) dC[th] = at::zeros({p.K, p.D}, A.options());
    if (need_b) db[th].assign(p.M, T(0));
  }
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    const int th = at::get_thread_num();
    std::vector<T> S_buf(BLOCK * BLOCK), H_buf(BLOCK * BLOCK), L(BLOCK * BLOCK),
        artanh_S(p.scaled ? 0 : BLOCK * BLOCK);
    T* db_th = need_b ? db[th].data() : nullptr;
    for (int64_t q = begin; q < end; ++q) {
      const Tile t = make_tile(p, tiles[q].first, tiles[q].second);
      const at::Tensor A_r = A.narrow(0, t.r0, t.bm), C_k = C.narrow(0, t.k0, t.bn);
      const T* S = tile_similarity(A_r, C_k, S_buf);
      if (!p.scaled) artanh_logits(p, S, t.bm * t.bn, artanh_S.data());
      const at::Tensor H = at::from_blob(H_buf.data(), {t.bm, t.bn}, A.options());
      T* h = H.data_ptr<T>();

      // Row side: H = G_row * dl/dS.
      side_logits(p, t, S, artanh_S.data(), inv_temp, false, L.data());
      side_gradient(t, false, S, lse, grad_lse, L.data(), db_th);
      for (int64_t r = 0; r < t.bm; ++r) {
        const T* g = L.data() + r * t.bn;
        T* hr = h + r * t.bn;
        const T* s = S + r * t.bn;
        if (p.scaled) {
          const T b = inv_temp[t.r0 + r];
#pragma omp simd
          for (int64_t k = 0; k < t.bn; ++k) hr[k] = g[k] * b;
        } else {
          for (int64_t k = 0; k < t.bn; ++k) hr[k] = g[k] * artanh_slope(s[k], T(p.c), T(p.eps));
        }
      }
      // Column side (mirrored tile): H += G_col * dl/dS, both already in S's layout.
      if (t.mirrored) {
        side_logits(p, t, S, artanh_S.data(), inv_temp, true, L.data());
        side_gradient(t, true, S, lse, grad_lse, L.data(), db_th);
        for (int64_t r = 0; r < t.bm; ++r) {
          const T* g = L.data() + r * t.bn;
          T* hr = h + r * t.bn;
          const T* s = S + r * t.bn;
          if (p.scaled) {
            const T* b = inv_temp + t.k0;
#pragma omp simd
            for (int64_t k = 0; k < t.bn; ++k) hr[k] += g[k] * b[k];
          } else {
            for (int64_t k = 0; k < t.bn; ++k)
              hr[k] += g[k] * artanh_slope(s[k], T(p.c), T(p.eps));
          }
        }
      }
      // dA_r += H C_k; dC_k += H^T A_r (symmetric: both into dU).
      if (p.symmetric || need_a) dA[th].narrow(0, t.r0, t.bm).addmm_(H, C_k);
      if (p.symmetric) {
        dA[th].narrow(0, t.k0, t.bn).addmm_(H.t(), A_r);
      } else if (need_c) {
        dC[th].narrow(0, t.k0, t.bn).addmm_(H.t(), A_r);
      }
    }
  });
  at::Tensor grad_a, grad_c, grad_b;
  if (p.symmetric || need_a) {
    grad_a = dA[0];
    for (int th = 1; th < num_threads; ++th) grad_a.add_(dA[th]);
  }
  if (!p.symmetric && need_c) {
    grad_c = dC[0];
    for (int th = 1; th < num_threads; ++th) grad_c.add_(dC[th]);
  }
  if (need_b) {
    grad_b = at::zeros({p.M}, A.options());
    T* out = grad_b.data_ptr<T>();
    for (int th = 0; th < num_threads; ++th)
      for (int64_t a = 0; a < p.M; ++a) out[a] += db[th][a];
  }
  return {grad_a, grad_c, grad_b};
}

Problem make_problem(const at::Tensor& A, const at::Tensor& C,
                     const c10::optional<at::Tensor>& inv_temp, const at::Tensor& pos,
                     const c10::optional<at::Tensor>& self, double artanh_scale,
                     double artanh_eps, bool symmetric) {
  TORCH_CHECK(A.device().is_cpu() && C.device().is_cpu(), "macl_kernels._C_cpu: CPU tensors only");
  TORCH_CHECK(A.dim() == 2 && C.dim() == 2 && A.size(1) == C.size(1),
              "macl_kernels._C_cpu: anchors [M, D] and candidates [K, D] expected");
  TORCH_CHECK(A.scalar_type() == C.scalar_type(), "anchors and candidates differ in dtype");
  TORCH_CHECK(A.is_contiguous() && C.is_contiguous(), "contiguous anchors/candidates expected");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.is_contiguous() && pos.numel() == A.size(0),
              "pos_index must be a contiguous int64 [M] tensor");
  const bool scaled = artanh_scale <= 0;
  if (scaled) {
    TORCH_CHECK(inv_temp.has_value() && inv_temp->numel() == A.size(0) &&
                    inv_temp->is_contiguous() && inv_temp->scalar_type() == A.scalar_type(),
                "the scaled map needs a contiguous inv_temp [M] of the anchors' dtype");
  }
  if (self.has_value()) {
    TORCH_CHECK(self->scalar_type() == at::kLong && self->is_contiguous() &&
                    self->numel() == A.size(0),
                "self_index must be a contiguous int64 [M] tensor");
  }
  TORCH_CHECK(!symmetric || (A.data_ptr() == C.data_ptr() && A.size(0) == C.size(0)),
              "symmetric mode needs the anchors to be the candidates");
  return {A.size(0), C.size(0), A.size(1), scaled, artanh_scale, artanh_eps, symmetric,
          pos.data_ptr<int64_t>(), self.has_value() ? self->data_ptr<int64_t>() : nullptr};
}

at::Tensor forward(const at::Tensor& anchors, const at::Tensor& candidates,
                   const c10::optional<at::Tensor>& inv_temp, const at::Tensor& pos_index,
                   const c10::optional<at::Tensor>& self_index, double artanh_scale,
                   double artanh_eps, bool symmetric) {
  const Problem p = make_problem(anchors, candidates, inv_temp, pos_index, self_index,
                                 artanh_scale, artanh_eps, symmetric);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(anchors.scalar_type(), "macl_cpu_forward", [&] {
    // detach: the kernels write tiles with at::mm_out, which refuses inputs that require grad
    // (autograd is the caller's business: the custom op's registered backward).
    out = forward_impl<scalar_t>(p, anchors.detach(), candidates.detach(),
                                 p.scaled ? inv_temp->data_ptr<scalar_t>() : nullptr);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& anchors, const at::Tensor& candidates,
    const c10::optional<at::Tensor>& inv_temp, const at::Tensor& pos_index,
    const c10::optional<at::Tensor>& self_index, const at::Tensor& lse_neg,
    const at::Tensor& grad_lse_neg, double artanh_scale, double artanh_eps, bool symmetric,
    bool need_anchors, bool need_candidates, bool need_inv_temp) {
  const Problem p = make_problem(anchors, candidates, inv_temp, pos_index, self_index,
                                 artanh_scale, artanh_eps, symmetric);
  TORCH_CHECK(lse_neg.is_contiguous() && grad_lse_neg.is_contiguous() &&
                  lse_neg.scalar_type() == anchors.scalar_type() &&
                  grad_lse_neg.scalar_type() == anchors.scalar_type(),
              "lse_neg and its gradient must be contiguous, of the anchors' dtype");
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(anchors.scalar_type(), "macl_cpu_backward", [&] {
    out = backward_impl<scalar_t>(p, anchors.detach(), candidates.detach(),
                                  p.scaled ? inv_temp->data_ptr<scalar_t>() : nullptr,
                                  lse_neg.data_ptr<scalar_t>(), grad_lse_neg.data_ptr<scalar_t>(),
                                  need_anchors, need_candidates, need_inv_temp && p.scaled);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "macl-kernels fused CPU kernels (tiled, OpenMP via at::parallel_for)";
#ifdef MACL_BUILT_WITH_TORCH
  m.attr("built_with_torch") = MACL_BUILT_WITH_TORCH;  // so a mismatch can be named on load
#endif
  m.def("forward", &forward, "lse_neg of every anchor row",
        py::arg("anchors"), py::arg("candidates"), py::arg("inv_temp"), py::arg("pos_index"),
        py::arg("self_index"), py::arg("artanh_scale"), py::arg("artanh_eps"),
        py::arg("symmetric"));
  m.def("backward", &backward, "gradients of lse_neg: (d anchors, d candidates, d inv_temp)",
        py::arg("anchors"), py::arg("candidates"), py::arg("inv_temp"), py::arg("pos_index"),
        py::arg("self_index"), py::arg("lse_neg"), py::arg("grad_lse_neg"),
        py::arg("artanh_scale"), py::arg("artanh_eps"), py::arg("symmetric"),
        py::arg("need_anchors"), py::arg("need_candidates"), py::arg("need_inv_temp"));
}
