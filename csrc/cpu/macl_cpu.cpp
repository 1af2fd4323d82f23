// Fused CPU kernels for the contrastive primitive (backend "cpu"); the math is docs/math.md,
// section "The primitive", in the names of the glossary that Python, Triton and CUDA share.
//
// Per anchor row a (anchors [M, D], candidates [K, D], both L2-normalised):
//
//   S = anchors candidates^T,   l_ak = inv_temp[a] S_ak                               (Scaled)
//                            or l_ak = artanh_scale artanh(clamp(S_ak, -1 + artanh_eps,
//                                                                 1 - artanh_eps))   (Artanh)
//   Neg(a) = every k but pos_index[a] and self_index[a]
//   forward:  lse_neg[a] = log sum_{k in Neg(a)} exp(l_ak)          (online max/sum over tiles)
//   backward: Q_ak = exp(l_ak - lse_neg[a]) on Neg(a), 0 elsewhere;  dL_dl_ak = g_a Q_ak
//             dL_dS_ak = dL_dl_ak * dl_dS_ak  (dl_dS: inv_temp[a], or artanh_scale / (1 - S^2)
//                                              inside the clamp, 0 outside)
//             d_anchors = dL_dS candidates,   d_candidates = dL_dS^T anchors,
//             d_inv_temp[a] = sum_k dL_dl_ak S_ak                                 (Scaled only)
//
// The M x K matrix is never formed: the work is a list of BLOCK x BLOCK tiles spread over
// threads with at::parallel_for (OpenMP in PyTorch's CPU build). Each tile's S comes from one
// BLAS GEMM (at::mm), its exponentials from a branch-free polynomial exp that the compiler
// vectorises, and the gradient GEMMs of backward accumulate into per-thread buffers summed at
// the end (no atomics; for a given thread count the result is bitwise reproducible).
//
// symmetric (layout 2n on one process: the candidates are the anchors): S is symmetric, so only
// the tiles (i, j) with j >= i are computed. An off-diagonal tile serves the anchors of block i
// (its rows, logits inv_temp[a] S_ak) and those of block j (its columns, logits inv_temp[k]
// S_ak); in backward both sides land in one dL_dS_ij = dL_dS_row + dL_dS_col^T, and
// d_anchors_i += dL_dS_ij anchors_j, d_anchors_j += dL_dS_ij^T anchors_i: half the GEMM work of
// the plain tiling. A diagonal tile already holds every pair of its block as a row. d_anchors is
// then the whole gradient of the one tensor, and d_candidates is undefined.
//
// both_directions (layout cross_sym on one process: CLIP's image->text and text->image): the
// columns of S are anchors too, against the rows. Every tile is "mirrored" the same way: its rows
// update the row statistics (lse_neg[0..M), inv_temp[a], pos_index[a] a candidate) and its
// columns the column statistics (lse_neg[M..M+K), inv_temp[M + k], pos_index[M + k] an anchor
// row), from the one S; backward forms dL_dS = dL_dS_row + dL_dS_col of the tile and
// d_anchors_r += dL_dS candidates_k, d_candidates_k += dL_dS^T anchors_r: the GEMM work of one
// cross problem for both directions (the two-call path did it twice). The column statistics of
// one tile are a partial (max, sum) per column, merged into the calling thread's online state
// like the row ones, and the threads' states are merged in a fixed order at the end: no
// atomics, and the same bits for a given thread count. Extra memory: the per-thread states grow
// by K entries each (2 x K x threads values).
//
// Passes and GEMM work (M anchors, K candidates, D columns): forward 1 pass, M K D multiply-adds
// (symmetric: about half); backward 1 pass, 3 M K D (symmetric: about half). both_directions:
// the same as one cross problem, for M + K anchors.

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

// How a similarity S_ak becomes a logit l_ak; the values are macl_kernels.LogitMap's (and
// Triton's LOGIT_MAP, CUDA's MACL_LOGIT_MAP_*).
enum class LogitMap : int64_t { Scaled = 0, Artanh = 1 };

// 256 x 256 tiles: one GEMM of 256 x 256 x D per tile keeps at::mm's call overhead small, and
// a tile's S plus its logits (2 x 256 KiB in fp32) stay in this machine's 512 KiB L2.
constexpr int64_t BLOCK = 256;

// exp for float: 2^(x log2 e) = 2^n 2^f with |f| <= 1/2, 2^f by a degree-6 polynomial
// (relative error ~2 ulp, far inside the tolerance of docs/math.md, section "Tolerances").
// Written so that loops over it vectorise (checked with perf: the first version, with
// nearbyint and memcpy bit casts, ran scalar): round-to-nearest by the 1.5 * 2^23 trick (exact
// without -ffast-math, which we do not use: it would also assume away the infinities that mark
// excluded pairs), bit casts by std::bit_cast, and selects instead of branches.
// exp(x) = 0 for x < -87.3, x = -inf included.
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
  LogitMap logit_map;
  double artanh_scale, artanh_eps;  // LogitMap::Artanh's scale and clamp
  bool symmetric;
  bool both_directions;  // the columns are anchors too (entries M..M+K of the per-anchor arrays)
  const int64_t* pos_index;
  const int64_t* self_index;  // nullptr: no self among the candidates

  bool scaled() const { return logit_map == LogitMap::Scaled; }
  // Entries of lse_neg and of the per-anchor arrays.
  int64_t num_lse() const { return both_directions ? M + K : M; }
  // Where a column's entries start in the per-anchor arrays: symmetric, the column k is anchor
  // k; both_directions, anchor M + k.
  int64_t column_offset() const { return both_directions ? M : 0; }
  int64_t blocks_m() const { return (M + BLOCK - 1) / BLOCK; }
  int64_t blocks_k() const { return (K + BLOCK - 1) / BLOCK; }

  // The tiles to compute: every (i, j), or j >= i when symmetric.
  std::vector<std::pair<int64_t, int64_t>> tiles() const {
    std::vector<std::pair<int64_t, int64_t>> out;
    for (int64_t i = 0; i < blocks_m(); ++i)
      for (int64_t j = symmetric ? i : 0; j < blocks_k(); ++j) out.emplace_back(i, j);
    return out;
  }
};

// A tile: anchor rows r0..r0+bm against candidate rows k0..k0+bn, with
// S = anchors_r candidates_k^T.
struct Tile {
  int64_t i, j, r0, k0, bm, bn;
  bool mirrored;  // symmetric off-diagonal: the columns are anchors too
};

Tile make_tile(const Problem& p, int64_t i, int64_t j) {
  const int64_t r0 = i * BLOCK, k0 = j * BLOCK;
  return {i, j, r0, k0, std::min(BLOCK, p.M - r0), std::min(BLOCK, p.K - k0),
          (p.symmetric && j != i) || p.both_directions};
}

// dl_dS of LogitMap::Artanh: artanh_scale / (1 - S^2) inside the clamp, 0 outside (finite at
// S = +-1; docs/math.md, section "Numerical hazards").
template <typename T>
inline T artanh_slope(T s, T artanh_scale, T artanh_eps) {
  return std::abs(s) < T(1) - artanh_eps
             ? artanh_scale / std::max(T(1) - s * s, artanh_eps)
             : T(0);
}

// The logits of one side of a tile, laid out like S (L[r * bn + k] pairs row r0 + r with
// column k0 + k). Row side: anchor r0 + r, logit inv_temp[a] S. Column side: column k0 + k as
// an anchor (entry c = column_offset + k0 + k) against row r0 + r, logit inv_temp[c] S.
// Excluded pairs (pos_index, self_index) are -inf.
template <typename T>
void side_logits(const Problem& p, const Tile& t, const T* S, const T* artanh_S,
                 const T* inv_temp, bool column_side, T* L) {
  for (int64_t r = 0; r < t.bm; ++r) {
    const T* s = S + r * t.bn;
    T* l = L + r * t.bn;
    if (!p.scaled()) {
      std::memcpy(l, artanh_S + r * t.bn, sizeof(T) * t.bn);
    } else if (column_side) {
      const T* inv_temp_k = inv_temp + p.column_offset() + t.k0;
#pragma omp simd
      for (int64_t k = 0; k < t.bn; ++k) l[k] = inv_temp_k[k] * s[k];
    } else {
      const T inv_temp_a = inv_temp[t.r0 + r];
#pragma omp simd
      for (int64_t k = 0; k < t.bn; ++k) l[k] = inv_temp_a * s[k];
    }
  }
  // anchor: the row or column index in the tile's frame; entry: its per-anchor array entry.
  auto exclude = [&](int64_t anchor, int64_t candidate) {
    const int64_t r = (column_side ? candidate : anchor) - t.r0;
    const int64_t k = (column_side ? anchor : candidate) - t.k0;
    if (r >= 0 && r < t.bm && k >= 0 && k < t.bn) L[r * t.bn + k] = neg_inf<T>();
  };
  const int64_t first = column_side ? t.k0 : t.r0;
  const int64_t count = column_side ? t.bn : t.bm;
  const int64_t offset = column_side ? p.column_offset() : 0;
  for (int64_t a = first; a < first + count; ++a) {
    exclude(a, p.pos_index[offset + a]);
    if (p.self_index) exclude(a, p.self_index[offset + a]);
  }
}

template <typename T>
void artanh_logits(const Problem& p, const T* S, int64_t n, T* out) {
  const T artanh_scale = T(p.artanh_scale), lo = T(-1) + T(p.artanh_eps),
          hi = T(1) - T(p.artanh_eps);
  for (int64_t q = 0; q < n; ++q)
    out[q] = artanh_scale * std::atanh(std::min(std::max(S[q], lo), hi));
}

// S = anchors_r candidates_k^T for one tile, by BLAS, into the calling thread's buffer (laid
// out [bm, bn]). Writing into a reused buffer matters: a fresh 256 KiB tensor per tile sits
// between glibc's mmap threshold and its heap, and thousands of them grew the peak RSS by
// hundreds of MiB.
template <typename T>
const T* tile_similarity(const at::Tensor& anchors_r, const at::Tensor& candidates_k,
                         std::vector<T>& buf) {
  at::Tensor out =
      at::from_blob(buf.data(), {anchors_r.size(0), candidates_k.size(0)}, anchors_r.options());
  at::mm_out(out, anchors_r, candidates_k.t());
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
at::Tensor forward_impl(const Problem& p, const at::Tensor& anchors,
                        const at::Tensor& candidates, const T* inv_temp) {
  const auto tiles = p.tiles();
  std::vector<OnlineLse<T>> states(at::get_num_threads(), OnlineLse<T>(p.num_lse()));
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    OnlineLse<T>& state = states[at::get_thread_num()];
    std::vector<T> S_buf(BLOCK * BLOCK), L(BLOCK * BLOCK),
        artanh_S(p.scaled() ? 0 : BLOCK * BLOCK);
    std::vector<T> col_max(BLOCK), col_sum(BLOCK);
    for (int64_t q = begin; q < end; ++q) {
      const Tile t = make_tile(p, tiles[q].first, tiles[q].second);
      const T* S = tile_similarity(anchors.narrow(0, t.r0, t.bm),
                                   candidates.narrow(0, t.k0, t.bn), S_buf);
      if (!p.scaled()) artanh_logits(p, S, t.bm * t.bn, artanh_S.data());

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
        if (col_sum[k] > T(0)) state.merge(p.column_offset() + t.k0 + k, col_max[k], col_sum[k]);
    }
  });
  at::Tensor lse_neg = at::empty({p.num_lse()}, anchors.options());
  T* out = lse_neg.data_ptr<T>();
  at::parallel_for(0, p.num_lse(), 2048, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      T m = neg_inf<T>();
      for (const auto& st : states) m = std::max(m, st.max[a]);
      T s = 0;
      for (const auto& st : states)
        if (st.max[a] != neg_inf<T>()) s += st.sum[a] * std::exp(st.max[a] - m);
      out[a] = m + std::log(s);  // -inf for an anchor without negatives (callers forbid it)
    }
  });
  return lse_neg;
}

// dL_dl = g_a Q_ak = g_a exp(l - lse_neg[a]) in place over the logits L of one side (rows:
// entry r0 + r; columns: entry column_offset + k0 + k), accumulating
// d_inv_temp[a] += sum_k dL_dl_ak S_ak when asked (d_inv_temp not null).
template <typename T>
void side_gradient(const Problem& p, const Tile& t, bool column_side, const T* S,
                   const T* lse_neg, const T* g, T* L, T* d_inv_temp) {
  const int64_t c0 = p.column_offset() + t.k0;
  for (int64_t r = 0; r < t.bm; ++r) {
    T* l = L + r * t.bn;
    const T* s = S + r * t.bn;
    if (column_side) {
      const T* lse_neg_k = lse_neg + c0;
      const T* g_k = g + c0;
#pragma omp simd
      for (int64_t k = 0; k < t.bn; ++k) l[k] = g_k[k] * exp_approx(l[k] - lse_neg_k[k]);
      if (d_inv_temp) {
        T* d_inv_temp_k = d_inv_temp + c0;
        for (int64_t k = 0; k < t.bn; ++k) d_inv_temp_k[k] += l[k] * s[k];
      }
    } else {
      const T lse_neg_a = lse_neg[t.r0 + r], g_a = g[t.r0 + r];
#pragma omp simd
      for (int64_t k = 0; k < t.bn; ++k) l[k] = g_a * exp_approx(l[k] - lse_neg_a);
      if (d_inv_temp) {
        T d_inv_temp_a = 0;
#pragma omp simd reduction(+ : d_inv_temp_a)
        for (int64_t k = 0; k < t.bn; ++k) d_inv_temp_a += l[k] * s[k];
        d_inv_temp[t.r0 + r] += d_inv_temp_a;
      }
    }
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const Problem& p, const at::Tensor& anchors, const at::Tensor& candidates,
    const T* inv_temp, const T* lse_neg, const T* g, bool need_d_anchors,
    bool need_d_candidates, bool need_d_inv_temp) {
  const auto tiles = p.tiles();
  const int num_threads = at::get_num_threads();
  // Per-thread accumulators of d_anchors (symmetric: the whole gradient), d_candidates and
  // d_inv_temp, summed over threads at the end.
  std::vector<at::Tensor> d_anchors_th(num_threads), d_candidates_th(num_threads);
  std::vector<std::vector<T>> d_inv_temp_th(num_threads);
  for (int th = 0; th < num_threads; ++th) {
    d_anchors_th[th] = at::zeros({p.M, p.D}, anchors.options());
    if (!p.symmetric) d_candidates_th[th] = at::zeros({p.K, p.D}, anchors.options());
    if (need_d_inv_temp) d_inv_temp_th[th].assign(p.num_lse(), T(0));
  }
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    const int th = at::get_thread_num();
    std::vector<T> S_buf(BLOCK * BLOCK), dL_dS_buf(BLOCK * BLOCK), L(BLOCK * BLOCK),
        artanh_S(p.scaled() ? 0 : BLOCK * BLOCK);
    T* d_inv_temp = need_d_inv_temp ? d_inv_temp_th[th].data() : nullptr;
    for (int64_t q = begin; q < end; ++q) {
      const Tile t = make_tile(p, tiles[q].first, tiles[q].second);
      const at::Tensor anchors_r = anchors.narrow(0, t.r0, t.bm),
                       candidates_k = candidates.narrow(0, t.k0, t.bn);
      const T* S = tile_similarity(anchors_r, candidates_k, S_buf);
      if (!p.scaled()) artanh_logits(p, S, t.bm * t.bn, artanh_S.data());
      const at::Tensor dL_dS = at::from_blob(dL_dS_buf.data(), {t.bm, t.bn}, anchors.options());
      T* dL_dS_data = dL_dS.data_ptr<T>();

      // Row side: dL_dS = dL_dl_row * dl_dS.
      side_logits(p, t, S, artanh_S.data(), inv_temp, false, L.data());
      side_gradient(p, t, false, S, lse_neg, g, L.data(), d_inv_temp);
      for (int64_t r = 0; r < t.bm; ++r) {
        const T* dL_dl = L.data() + r * t.bn;
        T* dL_dS_r = dL_dS_data + r * t.bn;
        const T* s = S + r * t.bn;
        if (p.scaled()) {
          const T inv_temp_a = inv_temp[t.r0 + r];
#pragma omp simd
          for (int64_t k = 0; k < t.bn; ++k) dL_dS_r[k] = dL_dl[k] * inv_temp_a;
        } else {
          for (int64_t k = 0; k < t.bn; ++k)
            dL_dS_r[k] =
                dL_dl[k] * artanh_slope(s[k], T(p.artanh_scale), T(p.artanh_eps));
        }
      }
      // Column side (mirrored tile): dL_dS += dL_dl_col * dl_dS, both already in S's layout.
      if (t.mirrored) {
        side_logits(p, t, S, artanh_S.data(), inv_temp, true, L.data());
        side_gradient(p, t, true, S, lse_neg, g, L.data(), d_inv_temp);
        for (int64_t r = 0; r < t.bm; ++r) {
          const T* dL_dl = L.data() + r * t.bn;
          T* dL_dS_r = dL_dS_data + r * t.bn;
          const T* s = S + r * t.bn;
          if (p.scaled()) {
            const T* inv_temp_k = inv_temp + p.column_offset() + t.k0;
#pragma omp simd
            for (int64_t k = 0; k < t.bn; ++k) dL_dS_r[k] += dL_dl[k] * inv_temp_k[k];
          } else {
            for (int64_t k = 0; k < t.bn; ++k)
              dL_dS_r[k] +=
                  dL_dl[k] * artanh_slope(s[k], T(p.artanh_scale), T(p.artanh_eps));
          }
        }
      }
      // d_anchors_r += dL_dS candidates_k; d_candidates_k += dL_dS^T anchors_r (symmetric:
      // both into d_anchors).
      if (p.symmetric || need_d_anchors)
        d_anchors_th[th].narrow(0, t.r0, t.bm).addmm_(dL_dS, candidates_k);
      if (p.symmetric) {
        d_anchors_th[th].narrow(0, t.k0, t.bn).addmm_(dL_dS.t(), anchors_r);
      } else if (need_d_candidates) {
        d_candidates_th[th].narrow(0, t.k0, t.bn).addmm_(dL_dS.t(), anchors_r);
      }
    }
  });
  at::Tensor d_anchors, d_candidates, d_inv_temp;
  if (p.symmetric || need_d_anchors) {
    d_anchors = d_anchors_th[0];
    for (int th = 1; th < num_threads; ++th) d_anchors.add_(d_anchors_th[th]);
  }
  if (!p.symmetric && need_d_candidates) {
    d_candidates = d_candidates_th[0];
    for (int th = 1; th < num_threads; ++th) d_candidates.add_(d_candidates_th[th]);
  }
  if (need_d_inv_temp) {
    d_inv_temp = at::zeros({p.num_lse()}, anchors.options());
    T* out = d_inv_temp.data_ptr<T>();
    for (int th = 0; th < num_threads; ++th)
      for (int64_t a = 0; a < p.num_lse(); ++a) out[a] += d_inv_temp_th[th][a];
  }
  return {d_anchors, d_candidates, d_inv_temp};
}

LogitMap to_logit_map(int64_t logit_map) {
  TORCH_CHECK(logit_map == static_cast<int64_t>(LogitMap::Scaled) ||
                  logit_map == static_cast<int64_t>(LogitMap::Artanh),
              "logit_map must be 0 (scaled) or 1 (artanh), got ", logit_map);
  return static_cast<LogitMap>(logit_map);
}

Problem make_problem(const at::Tensor& anchors, const at::Tensor& candidates,
                     const c10::optional<at::Tensor>& inv_temp, const at::Tensor& pos_index,
                     const c10::optional<at::Tensor>& self_index, int64_t logit_map_value,
                     double artanh_scale, double artanh_eps, bool symmetric,
                     bool both_directions) {
  TORCH_CHECK(anchors.device().is_cpu() && candidates.device().is_cpu(),
              "macl_kernels._C_cpu: CPU tensors only");
  TORCH_CHECK(anchors.dim() == 2 && candidates.dim() == 2 &&
                  anchors.size(1) == candidates.size(1),
              "macl_kernels._C_cpu: anchors [M, D] and candidates [K, D] expected");
  TORCH_CHECK(anchors.scalar_type() == candidates.scalar_type(),
              "anchors and candidates differ in dtype");
  TORCH_CHECK(anchors.is_contiguous() && candidates.is_contiguous(),
              "contiguous anchors/candidates expected");
  TORCH_CHECK(!(symmetric && both_directions), "symmetric and both_directions exclude each other");
  // Per-anchor entries: M, or M + K with both_directions (rows, then columns).
  const int64_t num_lse = anchors.size(0) + (both_directions ? candidates.size(0) : 0);
  TORCH_CHECK(pos_index.scalar_type() == at::kLong && pos_index.is_contiguous() &&
                  pos_index.numel() == num_lse,
              "pos_index must be a contiguous int64 tensor of M (both_directions: M + K) entries");
  const LogitMap logit_map = to_logit_map(logit_map_value);
  if (logit_map == LogitMap::Scaled) {
    TORCH_CHECK(inv_temp.has_value() && inv_temp->numel() == num_lse &&
                    inv_temp->is_contiguous() && inv_temp->scalar_type() == anchors.scalar_type(),
                "the scaled map needs a contiguous inv_temp of M (both_directions: M + K) "
                "entries of the anchors' dtype");
  } else {
    TORCH_CHECK(artanh_scale > 0, "the artanh map needs artanh_scale > 0, got ", artanh_scale);
    TORCH_CHECK(artanh_eps > 0 && artanh_eps < 1,
                "the artanh map needs 0 < artanh_eps < 1, got ", artanh_eps);
  }
  if (self_index.has_value()) {
    TORCH_CHECK(self_index->scalar_type() == at::kLong && self_index->is_contiguous() &&
                    self_index->numel() == num_lse,
                "self_index must be a contiguous int64 tensor of M (both_directions: M + K) "
                "entries");
  }
  TORCH_CHECK(!symmetric || (anchors.data_ptr() == candidates.data_ptr() &&
                             anchors.size(0) == candidates.size(0)),
              "symmetric mode needs the anchors to be the candidates");
  return {anchors.size(0),
          candidates.size(0),
          anchors.size(1),
          logit_map,
          artanh_scale,
          artanh_eps,
          symmetric,
          both_directions,
          pos_index.data_ptr<int64_t>(),
          self_index.has_value() ? self_index->data_ptr<int64_t>() : nullptr};
}

at::Tensor forward(const at::Tensor& anchors, const at::Tensor& candidates,
                   const c10::optional<at::Tensor>& inv_temp, const at::Tensor& pos_index,
                   const c10::optional<at::Tensor>& self_index, int64_t logit_map,
                   double artanh_scale, double artanh_eps, bool symmetric,
                   bool both_directions) {
  const Problem p = make_problem(anchors, candidates, inv_temp, pos_index, self_index, logit_map,
                                 artanh_scale, artanh_eps, symmetric, both_directions);
  at::Tensor lse_neg;
  AT_DISPATCH_FLOATING_TYPES(anchors.scalar_type(), "macl_cpu_forward", [&] {
    // detach: the kernels write tiles with at::mm_out, which refuses inputs that require grad
    // (autograd is the caller's business: the custom op's registered backward).
    lse_neg = forward_impl<scalar_t>(p, anchors.detach(), candidates.detach(),
                                     p.scaled() ? inv_temp->data_ptr<scalar_t>() : nullptr);
  });
  return lse_neg;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& anchors, const at::Tensor& candidates,
    const c10::optional<at::Tensor>& inv_temp, const at::Tensor& pos_index,
    const c10::optional<at::Tensor>& self_index, const at::Tensor& lse_neg, const at::Tensor& g,
    int64_t logit_map, double artanh_scale, double artanh_eps, bool symmetric,
    bool both_directions, bool need_d_anchors, bool need_d_candidates, bool need_d_inv_temp) {
  const Problem p = make_problem(anchors, candidates, inv_temp, pos_index, self_index, logit_map,
                                 artanh_scale, artanh_eps, symmetric, both_directions);
  TORCH_CHECK(lse_neg.is_contiguous() && g.is_contiguous() &&
                  lse_neg.scalar_type() == anchors.scalar_type() &&
                  g.scalar_type() == anchors.scalar_type(),
              "lse_neg and g must be contiguous, of the anchors' dtype");
  TORCH_CHECK(lse_neg.numel() == p.num_lse() && g.numel() == p.num_lse(),
              "lse_neg and g must have M (both_directions: M + K) entries");
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(anchors.scalar_type(), "macl_cpu_backward", [&] {
    out = backward_impl<scalar_t>(p, anchors.detach(), candidates.detach(),
                                  p.scaled() ? inv_temp->data_ptr<scalar_t>() : nullptr,
                                  lse_neg.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                                  need_d_anchors, need_d_candidates,
                                  need_d_inv_temp && p.scaled());
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
        py::arg("self_index"), py::arg("logit_map"), py::arg("artanh_scale"),
        py::arg("artanh_eps"), py::arg("symmetric"), py::arg("both_directions"));
  m.def("backward", &backward,
        "gradients of sum_a g[a] lse_neg[a]: (d_anchors, d_candidates, d_inv_temp); "
        "symmetric: d_anchors is the whole gradient and d_candidates is None",
        py::arg("anchors"), py::arg("candidates"), py::arg("inv_temp"), py::arg("pos_index"),
        py::arg("self_index"), py::arg("lse_neg"), py::arg("g"), py::arg("logit_map"),
        py::arg("artanh_scale"), py::arg("artanh_eps"), py::arg("symmetric"),
        py::arg("both_directions"), py::arg("need_d_anchors"), py::arg("need_d_candidates"), py::arg("need_d_inv_temp"));
}
