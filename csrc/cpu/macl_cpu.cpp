// Fused CPU kernels for the contrastive primitive (backend "cpu"); the math is docs/math.md,
// section "The primitive", in the names of the glossary that Python, Triton and CUDA share.
//
// Per anchor row a (anchors [M, D], candidates [K, D], both L2-normalised):
//
//   S = anchors candidates^T,   l_ak = inv_temp[a] S_ak                               (Scaled)
//                            or l_ak = artanh_scale artanh(clamp(S_ak, -1 + artanh_eps,
//                                                                 1 - artanh_eps))   (Artanh)
//   Neg(a) = every k but pos_index[a] and self_index[a] (and, with labels, every k with
//            candidate_labels[k] == anchor_labels[a])
//   forward:  lse_neg[a] = log sum_{k in Neg(a)} exp(l_ak)          (online max/sum over tiles)
//             eqs[a] = sum_{k in Neg(a)} Q_ak S_ak   (on request: one more online sum t_a of
//             exp(l - max) S, rescaled with s_a; eqs = t_a / s_a)
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
//
// RowReduction::Softplus (SigLIP, docs/math.md, section "SigLIP"): l_ak = inv_temp[a] S_ak +
// row_bias[a] (Scaled map, cross problems only: Python refuses the rest), and
//   forward:  sp_neg[a] = sum_{k in Neg(a)} softplus(l_ak)       (a plain sum: no running max)
//   backward: dL_dl_ak = g_a sigmoid(l_ak) on Neg(a) (no forward statistic), dL_dS = dL_dl
//             inv_temp[a], the same two GEMMs, d_inv_temp as above, d_row_bias[a] = sum_k dL_dl.
// softplus(x) = max(x, 0) + log1p(exp(-|x|)) and sigmoid(x) from exp(-|x|) as well: no overflow
// at any |x|. Since sigmoid needs no row statistic, a forward that will be differentiated
// (with_grads) also accumulates the gradients' tile products with g left out: E = W candidates
// and F = W^T anchors with W_ak = inv_temp[a] sigmoid(l_ak), plus two per-row sums. The backward
// is then a per-row scale by g (d_anchors, d_inv_temp, d_row_bias) and, when g is one constant c
// (a mean or a sum: the losses' case), d_candidates = c F: 1 pass, 3 M K D multiply-adds in all
// (the minimum). Threads own whole row blocks, so E and the row sums go straight into the
// output; F is the one sum over rows: thread 0 adds into the output, each other thread into a
// K x D buffer of its own, merged in thread order (extra memory (threads - 1) K D, was
// (M + K) D per thread in 0.2). Any other g recomputes the candidate side
// (softplus_backward: 2 M K D more). Without gradients the forward is M K D.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// How a similarity S_ak becomes a logit l_ak; the values are macl_kernels.LogitMap's (and
// Triton's LOGIT_MAP, CUDA's MACL_LOGIT_MAP_*).
enum class LogitMap : int64_t { Scaled = 0, Artanh = 1 };

// What a row's negatives reduce to; the values are macl_kernels.RowReduction's (and Triton's
// ROW_REDUCTION, CUDA's MACL_ROW_REDUCTION_*).
enum class RowReduction : int64_t { Lse = 0, Softplus = 1 };

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
// always_inline: the vectorised tile loops call it; an out-of-line call would stop the vectoriser.
__attribute__((always_inline)) inline float exp_approx(float x) {
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

// log1p(y) for y in [0, 1], branch-free so that loops over it vectorise: log(1 + y) =
// 2 artanh(z) = 2 (z + z^3/3 + z^5/5 + ...) with z = y / (2 + y) in [0, 1/3]; eight terms leave a
// relative error below (1/9)^8 / 17 ~ 1.4e-9, under float's rounding.
inline float log1p_unit(float y) {
  const float z = y / (2.0f + y), z2 = z * z;
  float p = 1.0f / 17.0f;
  p = p * z2 + 1.0f / 15.0f;
  p = p * z2 + 1.0f / 13.0f;
  p = p * z2 + 1.0f / 11.0f;
  p = p * z2 + 1.0f / 9.0f;
  p = p * z2 + 1.0f / 7.0f;
  p = p * z2 + 1.0f / 5.0f;
  p = p * z2 + 1.0f / 3.0f;
  p = p * z2 + 1.0f;
  return 2.0f * z * p;
}

inline double log1p_unit(double y) { return std::log1p(y); }

// softplus(x) = max(x, 0) + log1p(e^-|x|): exact at any x (no overflow at |x| = 1e4, no
// cancellation), 0 at x = -inf (an excluded pair); NaN stays NaN (x < 0 is false for NaN).
template <typename T>
inline T softplus_stable(T x) {
  const T e = exp_approx(-std::abs(x));
  return (x < T(0) ? T(0) : x) + log1p_unit(e);
}

// sigmoid(x) from e = e^-|x| <= 1: 1 / (1 + e) for x >= 0, e / (1 + e) below; 0 at x = -inf.
template <typename T>
inline T sigmoid_stable(T x) {
  const T e = exp_approx(-std::abs(x));
  const T r = T(1) / (T(1) + e);
  return x >= T(0) ? r : (x < T(0) ? e * r : x);
}

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
  const int64_t* anchor_labels;     // nullptr: no label mask
  const int64_t* candidate_labels;  // the anchors' labels when symmetric

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

template <typename T>
void artanh_logits(const Problem& p, const T* S, int64_t n, T* out) {
  const T artanh_scale = T(p.artanh_scale), lo = T(-1) + T(p.artanh_eps),
          hi = T(1) - T(p.artanh_eps);
  for (int64_t q = 0; q < n; ++q)
    out[q] = artanh_scale * std::atanh(std::min(std::max(S[q], lo), hi));
}

// The tile GEMMs, on raw pointers into contiguous row-major [rows, D] matrices, by the Fortran
// BLAS that torch's CPU library carries and exports (sgemm_ / dgemm_: MKL on x86-64 builds): no
// tensor object, narrow or dispatch per tile. Through at::mm_out / addmm_ each tile cost about
// ten dispatcher calls (measured: 770 narrow calls per CLIP step at N = 4096, 3-6 % of the step).
// The symbols are declared weak: a torch build without them (or with another BLAS interface)
// takes the same products through ATen (blas_gemm's fallback), correct and a little slower.
// Inside the tile loop's parallel region the BLAS runs single-threaded, one tile per thread.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

// A column-major (rows x cols, leading dimension ld) matrix as a strided tensor view.
template <typename T>
at::Tensor column_major(const T* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {1, ld},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// C (m x n) = op(A) op(B) + beta C, column-major, op = transpose when trans_* is true.
template <typename T>
void blas_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k),
            ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb),
            ildc = static_cast<int>(ldc);
  const T one = T(1);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_) return sgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ilda, b, &ildb, &beta, c, &ildc);
  } else {
    if (dgemm_) return dgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ilda, b, &ildb, &beta, c, &ildc);
  }
  at::Tensor A = column_major(a, trans_a ? k : m, trans_a ? m : k, lda);
  at::Tensor B = column_major(b, trans_b ? n : k, trans_b ? k : n, ldb);
  at::Tensor C = column_major(c, m, n, ldc);
  const at::Tensor product = at::mm(trans_a ? A.t() : A, trans_b ? B.t() : B);
  if (beta == T(0)) C.copy_(product); else C.add_(product);
}

// S = anchors_r candidates_k^T for one tile, into the calling thread's buffer (laid out
// [bm, bn]). Writing into a reused buffer matters: a fresh 256 KiB tensor per tile sits between
// glibc's mmap threshold and its heap, and thousands of them grew the peak RSS by hundreds of
// MiB.
template <typename T>
const T* tile_similarity(const T* anchors, const T* candidates, const Tile& t, int64_t D,
                         std::vector<T>& buf) {
  // column-major: S^T [bn, bm] = (candidates_k, stored as D x bn)^T x (anchors_r, D x bm)
  blas_gemm<T>(true, false, t.bn, t.bm, D, candidates + t.k0 * D, D, anchors + t.r0 * D, D, T(0),
               buf.data(), t.bn);
  return buf.data();
}

// out[rows r0..r0+bm] += G [bm, bn] x X[rows k0..k0+bn]   (G row-major, leading dimension bn)
template <typename T>
void gemm_rows(const T* G, int64_t bm, int64_t bn, const T* X_k, int64_t D, T* out_r) {
  blas_gemm<T>(false, false, D, bm, bn, X_k, D, G, bn, T(1), out_r, D);
}

// out[rows k0..k0+bn] += G^T [bn, bm] x X[rows r0..r0+bm]
template <typename T>
void gemm_columns(const T* G, int64_t bm, int64_t bn, const T* X_r, int64_t D, T* out_k) {
  blas_gemm<T>(false, true, D, bn, bm, X_r, D, G, bn, T(1), out_k, D);
}

// Per-thread online log-sum-exp state for every anchor: running max, the sum of exp(l - max)
// and, when eqs is asked for, the sum of exp(l - max) S (rescaled alike).
template <typename T>
struct OnlineLse {
  std::vector<T> max, sum, sum_s;
  OnlineLse(int64_t m, bool need_eqs)
      : max(m, neg_inf<T>()), sum(m, T(0)), sum_s(need_eqs ? m : 0, T(0)) {}
  // a partial (m, s, ts) with terms exp(l - m) and exp(l - m) S. One exponential per merge, none
  // when m equals the running max (the forward's known shift makes that the common case: every
  // tile of a row has the same shift); the values are those of rescaling both sides by
  // exp(. - max(max[a], m)), bit for bit (the other side's factor is exp(0) = 1).
  void merge(int64_t a, T m, T s, T ts = T(0)) {
    if (m == neg_inf<T>()) return;
    if (m <= max[a]) {
      const T scale = m == max[a] ? T(1) : std::exp(m - max[a]);
      sum[a] += s * scale;
      if (!sum_s.empty()) sum_s[a] += ts * scale;
    } else {
      const T scale = std::exp(max[a] - m);  // 0 for the first partial (max[a] = -inf)
      sum[a] = sum[a] * scale + s;
      if (!sum_s.empty()) sum_s[a] = sum_s[a] * scale + ts;
      max[a] = m;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// The forward's known shift (docs/math.md#the-forwards-known-shift). A row's partial (m, sum of
// exp(l - m)) over a tile is exact algebra for any finite shift m; the max of the row's logits in
// the tile is only the choice that needs no check, and it costs a sweep over the tile before the
// exponentials. The forward instead shifts by a value it already knows: the row's running max
// over its earlier tiles in this thread's online state, capped by the Cauchy-Schwarz bound of
// the tile's logits (scaled map: l_ak = inv_temp[a] S_ak <= |inv_temp[a]| |u_a| max_k |v_k|),
// or that bound alone for a row's first tile. One pass over S instead of two. The risk is range
// in both directions (logits far below the shift underflow, far above it overflow), so a partial
// is kept only when its sum lies in [SHIFT_MIN_SUM, SHIFT_MAX_SUM] = [e^-60, e^60]: then no term
// exceeds e^60 (no overflow, and exp_approx's clamp at 88.7 never acts), the largest term is at
// least e^-60 / 256, and a term flushed to 0 (below e^-87.3 in float32) is below e^-21.8 (3e-10)
// of it. A row (column) that fails - NaN, no negative in the tile, out of range - is redone
// with its exact max. The artanh map keeps the max sweep. OnlineLse::max is then the shift in
// use, not always a logit maximum; a kept partial is at most 256 e^60, so a running sum stays
// below e^60 times the anchor's candidate count (e^81 at 1e9 candidates < float32's e^88.7).
// ---------------------------------------------------------------------------------------------

constexpr double SHIFT_MIN_SUM = 8.75651076269652e-27;  // e^-60
constexpr double SHIFT_MAX_SUM = 1.1420073898156842e26;  // e^60

// Whether a partial's sum with a known shift may be kept (false for NaN).
template <typename T>
inline bool shift_in_range(T sum) {
  return sum >= T(SHIFT_MIN_SUM) && sum <= T(SHIFT_MAX_SUM);
}

// The known shift of one anchor: its running max so far (finite: it has had negatives in an
// earlier tile of this thread), capped by this tile's bound; the bound alone otherwise.
template <typename T>
inline T known_shift(T running_max, T bound) {
  return std::isfinite(running_max) ? std::min(running_max, bound) : bound;
}

// |x_r| of every row of a contiguous [rows, D] matrix.
template <typename T>
std::vector<T> row_norms(const T* x, int64_t rows, int64_t D) {
  std::vector<T> out(rows);
  at::parallel_for(0, rows, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * D;
      T sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t d = 0; d < D; ++d) sq += xr[d] * xr[d];
      out[r] = std::sqrt(sq);
    }
  });
  return out;
}

// The largest of norms[first .. first + n) (NaN-tolerant either way: a NaN norm that is dropped
// here still makes its logits, and so the partial's sum, NaN, which fails the check).
template <typename T>
T max_norm(const std::vector<T>& norms, int64_t first, int64_t n) {
  T m = 0;
  for (int64_t q = first; q < first + n; ++q) m = std::max(m, norms[q]);
  return m;
}

// MASK_AFTER_LOAD: in every vectorised loop below, a masked pair's value is computed (loaded,
// exponentiated) like any other and replaced afterwards by a select. Written as `excluded ? 0 :
// exp(x[k] ...)` (or with a load on the right of `||`), the load happens only on one side of
// the condition, and GCC keeps that C++ meaning with AVX masked loads (vmaskmovps, slow on AMD
// Zen): measured on one 256 x 256 tile, the masked-load forms took 1.4x (exp sweep) to 2x (max
// sweep) the time of these. The selected value is the same (exp(-inf) = 0 before, 0 now), an
// excluded pair's NaN or overflow is dropped either way.
//
// The tile passes. Each reads S (and, for the artanh map, its logits A = artanh_scale
// artanh(clamp(S))) and never stores a logits tile: the logit of a pair is recomputed where it is
// used (one multiply), and an excluded pair (pos_index, self_index) is masked by comparing
// indices inside the vectorised loop. Row side: anchor r0 + r against column k0 + k, logit
// inv_temp[r0 + r] S. Column side: column k0 + k as an anchor (entry c = column_offset + k0 + k)
// against row r0 + r, logit inv_temp[c] S. Indices relative to the tile are int32 so that the
// masks run at the float lanes' width.

// index - first if it falls in [0, n), else -1 (no position of the tile matches it).
inline int32_t tile_position(int64_t index, int64_t first, int64_t n) {
  const int64_t r = index - first;
  return (r >= 0 && r < n) ? static_cast<int32_t>(r) : -1;
}

// Anchor a's excluded columns within a tile: its positive's and its self's position (-1 when
// outside the tile or absent).
struct ExcludedColumns {
  int32_t pos, self;
};

inline ExcludedColumns excluded_columns(const Problem& p, const Tile& t, int64_t a) {
  return {tile_position(p.pos_index[a], t.k0, t.bn),
          p.self_index ? tile_position(p.self_index[a], t.k0, t.bn) : -1};
}

// The columns' excluded rows of one tile (their positive and self among the anchors), relative
// to the tile.
struct ColumnExclusions {
  std::vector<int32_t> pos, self;
  ColumnExclusions() : pos(BLOCK), self(BLOCK) {}
  void fill(const Problem& p, const Tile& t) {
    const int64_t c0 = p.column_offset() + t.k0;
    for (int64_t k = 0; k < t.bn; ++k) {
      pos[k] = tile_position(p.pos_index[c0 + k], t.r0, t.bm);
      self[k] = p.self_index ? tile_position(p.self_index[c0 + k], t.r0, t.bm) : -1;
    }
  }
};

// The labels of one tile's rows and columns (label mask, E3): a pair whose row and column carry
// the same label is not a negative of either (the condition is symmetric, so one comparison
// serves the row side and the column side). Only filled when the problem has labels.
struct TileLabels {
  std::vector<int64_t> row, col;
  TileLabels() : row(BLOCK), col(BLOCK) {}
  void fill(const Problem& p, const Tile& t) {
    if (!p.anchor_labels) return;
    std::copy(p.anchor_labels + t.r0, p.anchor_labels + t.r0 + t.bm, row.begin());
    std::copy(p.candidate_labels + t.k0, p.candidate_labels + t.k0 + t.bn, col.begin());
  }
};

// Forward, row side: each row's partial (m, sum of exp(l - m)) over the tile, merged into the
// thread's online state; with need_eqs also sum exp(l - m) S (E4). m is the row's known shift
// (SCALED only, row_bound given) when its sum passes the check, else the row's max in the tile.
template <typename T, bool SCALED, bool LABELS>
void row_statistics(const Problem& p, const Tile& t, const T* S, const T* A, const T* inv_temp,
                    const T* row_bound, const TileLabels& labels, bool need_eqs,
                    OnlineLse<T>& state) {
  const int32_t bn = static_cast<int32_t>(t.bn);
  const int64_t* col_label = labels.col.data();
  for (int64_t r = 0; r < t.bm; ++r) {
    const int64_t a = t.r0 + r;
    const auto [kp, ks] = excluded_columns(p, t, a);
    const int64_t label_a = LABELS ? labels.row[r] : 0;
    const T* s_row = S + r * t.bn;
    const T* x = (SCALED ? S : A) + r * t.bn;
    const T scale = SCALED ? inv_temp[a] : T(1);
    // sums of exp(l - m) (and of exp(l - m) S) over the row's negatives in the tile
    const auto sums = [&](T m) {
      T sum = 0, sum_s = 0;
      if (need_eqs) {
#pragma omp simd reduction(+ : sum, sum_s)
        for (int32_t k = 0; k < bn; ++k) {
          const bool out = (k == kp) | (k == ks) | (LABELS && col_label[k] == label_a);
          const T e_all = exp_approx(scale * x[k] - m);  // see MASK_AFTER_LOAD
          const T e = out ? T(0) : e_all;
          sum += e;
          sum_s += e * s_row[k];
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int32_t k = 0; k < bn; ++k) {
          const bool out = (k == kp) | (k == ks) | (LABELS && col_label[k] == label_a);
          const T e = exp_approx(scale * x[k] - m);
          sum += out ? T(0) : e;
        }
      }
      return std::pair<T, T>{sum, sum_s};
    };
    if (SCALED && row_bound) {
      const T shift = known_shift(state.max[a], row_bound[r]);
      const auto [sum, sum_s] = sums(shift);
      if (shift_in_range(sum)) {  // false for NaN and for a row without negatives here
        state.merge(a, shift, sum, sum_s);
        continue;
      }
    }
    T m = neg_inf<T>();
#pragma omp simd reduction(max : m)
    for (int32_t k = 0; k < bn; ++k) {
      const bool out = (k == kp) | (k == ks) | (LABELS && col_label[k] == label_a);
      const T xk = scale * x[k];  // loaded unconditionally: see MASK_AFTER_LOAD
      const T l = out ? neg_inf<T>() : xk;
      m = l > m ? l : m;
    }
    if (m == neg_inf<T>()) continue;  // every candidate of this tile excluded
    const auto [sum, sum_s] = sums(m);
    state.merge(a, m, sum, sum_s);
  }
}

// Forward, column side: each column's partial (m, sum) over the tile's rows (and the E4 sum),
// m the column's known shift (SCALED only, col_bound given) where its sum passes the check,
// else its max over the tile's rows (a second pass for the columns that failed).
template <typename T, bool SCALED, bool LABELS>
void column_statistics(const Problem& p, const Tile& t, const T* S, const T* A,
                       const T* inv_temp, const T* col_bound, ColumnExclusions& ex,
                       const TileLabels& labels, bool need_eqs, std::vector<T>& col_max,
                       std::vector<T>& col_sum, std::vector<T>& col_sum_s, OnlineLse<T>& state) {
  const int64_t c0 = p.column_offset() + t.k0;
  const int32_t bn = static_cast<int32_t>(t.bn);
  ex.fill(p, t);
  const int32_t* pos = ex.pos.data();
  const int32_t* self = ex.self.data();
  const int64_t* col_label = labels.col.data();
  const T* scale = SCALED ? inv_temp + c0 : nullptr;
  T* cm = col_max.data();
  T* cs = col_sum.data();
  T* cts = need_eqs ? col_sum_s.data() : nullptr;
  // cs (and cts) = the columns' sums of exp(l - cm[k]) over the tile's rows
  const auto sums = [&] {
    std::fill(cs, cs + t.bn, T(0));
    if (cts) std::fill(cts, cts + t.bn, T(0));
    for (int32_t r = 0; r < static_cast<int32_t>(t.bm); ++r) {
      const T* s_row = S + r * t.bn;
      const T* x = (SCALED ? S : A) + r * t.bn;
      const int64_t label_r = LABELS ? labels.row[r] : 0;
      if (cts) {
#pragma omp simd
        for (int32_t k = 0; k < bn; ++k) {
          const bool out =
              (pos[k] == r) | (self[k] == r) | (LABELS && col_label[k] == label_r);
          const T e_all = exp_approx((SCALED ? scale[k] * x[k] : x[k]) - cm[k]);
          const T e = out ? T(0) : e_all;
          cs[k] += e;
          cts[k] += e * s_row[k];
        }
      } else {
#pragma omp simd
        for (int32_t k = 0; k < bn; ++k) {
          const bool out =
              (pos[k] == r) | (self[k] == r) | (LABELS && col_label[k] == label_r);
          const T e = exp_approx((SCALED ? scale[k] * x[k] : x[k]) - cm[k]);
          cs[k] += out ? T(0) : e;
        }
      }
    }
  };
  // Columns still to do: all of them, or those whose known-shift sum failed the check.
  std::array<bool, BLOCK> redo;
  std::fill(redo.begin(), redo.begin() + t.bn, true);
  if (SCALED && col_bound) {
    for (int64_t k = 0; k < t.bn; ++k) cm[k] = known_shift(state.max[c0 + k], col_bound[k]);
    sums();
    bool any_redo = false;
    for (int64_t k = 0; k < t.bn; ++k) {
      redo[k] = !shift_in_range(cs[k]);  // NaN and an empty column fail
      if (!redo[k]) state.merge(c0 + k, cm[k], cs[k], cts ? cts[k] : T(0));
      any_redo = any_redo || redo[k];
    }
    if (!any_redo) return;
  }
  std::fill(cm, cm + t.bn, neg_inf<T>());
  for (int32_t r = 0; r < static_cast<int32_t>(t.bm); ++r) {
    const T* x = (SCALED ? S : A) + r * t.bn;
    const int64_t label_r = LABELS ? labels.row[r] : 0;
#pragma omp simd
    for (int32_t k = 0; k < bn; ++k) {
      const bool out = (pos[k] == r) | (self[k] == r) | (LABELS && col_label[k] == label_r);
      const T xk = SCALED ? scale[k] * x[k] : x[k];
      const T l = out ? neg_inf<T>() : xk;
      cm[k] = l > cm[k] ? l : cm[k];
    }
  }
  // A column whose candidates are all excluded has max -inf: shift by 0 there (its terms are
  // exp(-inf) = 0 either way), never by -inf (which would give NaN).
  for (int64_t k = 0; k < t.bn; ++k) cm[k] = cm[k] == neg_inf<T>() ? T(0) : cm[k];
  sums();
  // cs = 0: no negatives in the tile; a NaN sum is merged (it makes the column's lse NaN)
  for (int64_t k = 0; k < t.bn; ++k)
    if (redo[k] && !(cs[k] == T(0))) state.merge(c0 + k, cm[k], cs[k], cts ? cts[k] : T(0));
}

// Backward, row side: dL_dS = g_a Q_ak dl_dS_ak (written), d_inv_temp[a] += sum_k g_a Q_ak S_ak
// (when d_inv_temp is not null; SCALED only). Q_ak = exp(l_ak - lse_neg[a]), 0 where excluded.
template <typename T, bool SCALED, bool LABELS>
void row_gradient(const Problem& p, const Tile& t, const T* S, const T* A, const T* inv_temp,
                  const T* lse_neg, const T* g, const TileLabels& labels, T* dL_dS,
                  T* d_inv_temp) {
  const int32_t bn = static_cast<int32_t>(t.bn);
  const T artanh_scale = T(p.artanh_scale), artanh_eps = T(p.artanh_eps);
  const int64_t* col_label = labels.col.data();
  for (int64_t r = 0; r < t.bm; ++r) {
    const int64_t a = t.r0 + r;
    const auto [kp, ks] = excluded_columns(p, t, a);
    const int64_t label_a = LABELS ? labels.row[r] : 0;
    const T* s = S + r * t.bn;
    const T* x = (SCALED ? S : A) + r * t.bn;
    T* out = dL_dS + r * t.bn;
    const T scale = SCALED ? inv_temp[a] : T(1);
    const T lse_a = lse_neg[a], g_a = g[a];
    T d_scale = 0;
#pragma omp simd reduction(+ : d_scale)
    for (int32_t k = 0; k < bn; ++k) {
      const bool excluded = (k == kp) | (k == ks) | (LABELS && col_label[k] == label_a);
      const T q_all = g_a * exp_approx(scale * x[k] - lse_a);
      const T q = excluded ? T(0) : q_all;
      d_scale += q * s[k];
      out[k] = q * (SCALED ? scale : artanh_slope(s[k], artanh_scale, artanh_eps));
    }
    if (SCALED && d_inv_temp) d_inv_temp[a] += d_scale;
  }
}

// Backward, column side: dL_dS_ak += g_c Q_ca dl_dS (c the column's entry), and
// d_inv_temp[c] += sum_a g_c Q_ca S_ak.
template <typename T, bool SCALED, bool LABELS>
void column_gradient(const Problem& p, const Tile& t, const T* S, const T* A, const T* inv_temp,
                     const T* lse_neg, const T* g, ColumnExclusions& ex,
                     const TileLabels& labels, T* dL_dS, T* d_inv_temp) {
  const int64_t c0 = p.column_offset() + t.k0;
  const int32_t bn = static_cast<int32_t>(t.bn);
  const T artanh_scale = T(p.artanh_scale), artanh_eps = T(p.artanh_eps);
  ex.fill(p, t);
  const int32_t* pos = ex.pos.data();
  const int32_t* self = ex.self.data();
  const int64_t* col_label = labels.col.data();
  const T* scale = SCALED ? inv_temp + c0 : nullptr;
  const T* lse_k = lse_neg + c0;
  const T* g_k = g + c0;
  T* d_inv_temp_k = (SCALED && d_inv_temp) ? d_inv_temp + c0 : nullptr;
  for (int32_t r = 0; r < static_cast<int32_t>(t.bm); ++r) {
    const T* s = S + r * t.bn;
    const T* x = (SCALED ? S : A) + r * t.bn;
    const int64_t label_r = LABELS ? labels.row[r] : 0;
    T* out = dL_dS + r * t.bn;
    if (d_inv_temp_k) {
#pragma omp simd
      for (int32_t k = 0; k < bn; ++k) {
        const bool excluded = (pos[k] == r) | (self[k] == r) | (LABELS && col_label[k] == label_r);
        const T q_all = g_k[k] * exp_approx(scale[k] * x[k] - lse_k[k]);
        const T q = excluded ? T(0) : q_all;
        d_inv_temp_k[k] += q * s[k];
        out[k] += q * scale[k];
      }
    } else {
#pragma omp simd
      for (int32_t k = 0; k < bn; ++k) {
        const bool excluded = (pos[k] == r) | (self[k] == r) | (LABELS && col_label[k] == label_r);
        const T l = SCALED ? scale[k] * x[k] : x[k];
        const T q_all = g_k[k] * exp_approx(l - lse_k[k]);
        const T q = excluded ? T(0) : q_all;
        out[k] += q * (SCALED ? scale[k] : artanh_slope(s[k], artanh_scale, artanh_eps));
      }
    }
  }
}

// Both sides of one tile (the column side only for a mirrored tile), forward and backward.
template <typename T, bool SCALED, bool LABELS>
void forward_tile(const Problem& p, const Tile& t, const T* S, const T* A, const T* inv_temp,
                  const T* row_bound, const T* col_bound, ColumnExclusions& ex,
                  const TileLabels& labels, bool need_eqs, std::vector<T>& col_max,
                  std::vector<T>& col_sum, std::vector<T>& col_sum_s, OnlineLse<T>& state) {
  row_statistics<T, SCALED, LABELS>(p, t, S, A, inv_temp, row_bound, labels, need_eqs, state);
  if (t.mirrored)
    column_statistics<T, SCALED, LABELS>(p, t, S, A, inv_temp, col_bound, ex, labels, need_eqs,
                                         col_max, col_sum, col_sum_s, state);
}

template <typename T, bool SCALED, bool LABELS>
void gradient_tile(const Problem& p, const Tile& t, const T* S, const T* A, const T* inv_temp,
                   const T* lse_neg, const T* g, ColumnExclusions& ex, const TileLabels& labels,
                   T* dL_dS, T* d_inv_temp) {
  row_gradient<T, SCALED, LABELS>(p, t, S, A, inv_temp, lse_neg, g, labels, dL_dS, d_inv_temp);
  if (t.mirrored)
    column_gradient<T, SCALED, LABELS>(p, t, S, A, inv_temp, lse_neg, g, ex, labels, dL_dS,
                                       d_inv_temp);
}

// ---------------------------------------------------------------------------------------------
// One exponential per pair for both directions (docs/math.md#one-exponential-for-both-directions).
// When the row logit and the column logit of every pair are the same number (one shared inv_temp,
// or the artanh map) and a pair excluded for its row is excluded for its column too, a mirrored
// tile's row sums and column sums can come from the same exp(l - C) with one constant C per tile,
// instead of exp(l - row max) and exp(l - column max): half the exponentials and half the sweeps
// over the tile. Two problems qualify: CLIP on one process (both_directions, the positives are the
// diagonal and nothing else is excluded) and layout 2n on one process with one temperature
// (symmetric: NT-Xent, MACL's batch temperature; the self pair is the diagonal and the positive of
// a's positive is a, so the excluded set is symmetric). Exact algebra; the only risk is range, so
// each tile checks it and falls back to the two-exponential passes above when a row or column
// statistic lies more than SHARED_EXP_SPAN below C: then every kept term exp(l - C) that flushes
// to 0 (l - C < -87.3) is below e^(-87.3 + 60) = 2e-12 of its row's or column's largest term. NaN
// anywhere in the tile fails the check (falls back). Diagonal tiles of a symmetric problem are not
// mirrored (every pair is one of their rows) and keep the row passes.
// ---------------------------------------------------------------------------------------------

constexpr double SHARED_EXP_SPAN = 60.0;

// Whether a problem qualifies (checked once per call).
template <typename T>
bool shared_exp_problem(const Problem& p, const T* inv_temp) {
  if (!(p.both_directions || p.symmetric) || p.anchor_labels || p.M == 0) return false;
  if (p.both_directions) {
    if (p.self_index || p.M != p.K) return false;
    for (int64_t a = 0; a < p.M; ++a)
      if (p.pos_index[a] != a || p.pos_index[p.M + a] != a) return false;
  } else {  // symmetric: excluded(a, k) must equal excluded(k, a)
    for (int64_t a = 0; a < p.M; ++a) {
      const int64_t pos = p.pos_index[a];
      if (pos < 0 || pos >= p.M || p.pos_index[pos] != a) return false;
      if (p.self_index && p.self_index[a] != a) return false;
    }
  }
  if (p.scaled()) {
    const T first = inv_temp[0];
    for (int64_t a = 1; a < p.num_lse(); ++a)
      if (!(inv_temp[a] == first)) return false;
  }
  return true;
}

// Forward of one tile with a known shift (scaled map): C = the largest of the known shifts of the
// tile's rows and columns (each at most its Cauchy-Schwarz bound) serves both directions, so one
// exponential pass gives the rows' and the columns' sums with no max sweep. Kept only when every
// row's and column's sum passes the range check; otherwise nothing is merged and the caller takes
// the max-shifted pass below.
template <typename T>
bool shared_forward_tile_known(const Problem& p, const Tile& t, const T* S, T scale,
                               const T* row_bound, const T* col_bound, std::vector<T>& col_sum,
                               std::vector<T>& row_sum, OnlineLse<T>& state) {
  const int64_t c0 = p.column_offset() + t.k0;
  T C = neg_inf<T>();
  for (int64_t r = 0; r < t.bm; ++r)
    C = std::max(C, known_shift(state.max[t.r0 + r], row_bound[r]));
  for (int64_t k = 0; k < t.bn; ++k)
    C = std::max(C, known_shift(state.max[c0 + k], col_bound[k]));
  if (!std::isfinite(C)) return false;
  const int32_t bn = static_cast<int32_t>(t.bn);
  T* cs = col_sum.data();
  T* rs = row_sum.data();
  std::fill(cs, cs + t.bn, T(0));
  for (int32_t r = 0; r < static_cast<int32_t>(t.bm); ++r) {
    const T* x = S + r * t.bn;
    const auto [kp, ks] = excluded_columns(p, t, t.r0 + r);  // the columns' exclusions too
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int32_t k = 0; k < bn; ++k) {
      const T e_all = exp_approx(scale * x[k] - C);
      const T e = ((k == kp) | (k == ks)) ? T(0) : e_all;
      sum += e;
      cs[k] += e;
    }
    rs[r] = sum;
  }
  for (int64_t r = 0; r < t.bm; ++r)
    if (!shift_in_range(rs[r])) return false;  // NaN, an empty row, or out of range
  for (int64_t k = 0; k < t.bn; ++k)
    if (!shift_in_range(cs[k])) return false;
  for (int64_t r = 0; r < t.bm; ++r) state.merge(t.r0 + r, C, rs[r]);
  for (int64_t k = 0; k < t.bn; ++k) state.merge(c0 + k, C, cs[k]);
  return true;
}

// Forward of one tile: one pass for both maxima, C = the tile's max logit, one exponential pass
// for the rows' and the columns' sums. Returns false (nothing merged) when the range check fails.
template <typename T, bool SCALED>
bool shared_forward_tile(const Problem& p, const Tile& t, const T* S, const T* A, T scale,
                         std::vector<T>& col_max, std::vector<T>& col_sum,
                         std::vector<T>& row_max, OnlineLse<T>& state) {
  const int32_t bn = static_cast<int32_t>(t.bn);
  T* cm = col_max.data();
  T* cs = col_sum.data();
  T* rm = row_max.data();
  std::fill(cm, cm + t.bn, neg_inf<T>());
  for (int32_t r = 0; r < static_cast<int32_t>(t.bm); ++r) {
    const T* x = (SCALED ? S : A) + r * t.bn;
    const auto [kp, ks] = excluded_columns(p, t, t.r0 + r);  // the columns' exclusions too
    T m = neg_inf<T>();
#pragma omp simd reduction(max : m)
    for (int32_t k = 0; k < bn; ++k) {
      const T xk = SCALED ? scale * x[k] : x[k];
      const T l = ((k == kp) | (k == ks)) ? neg_inf<T>() : xk;
      m = l > m ? l : m;
      cm[k] = l > cm[k] ? l : cm[k];
    }
    rm[r] = m;
  }
  // C and the range check; a row or column with every pair excluded (a 1 x 1 diagonal tile)
  // has max -inf and no terms: it is skipped, not checked.
  T C = neg_inf<T>(), lowest = std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < t.bm; ++r)
    if (rm[r] != neg_inf<T>()) C = std::max(C, rm[r]), lowest = std::min(lowest, rm[r]);
  for (int64_t k = 0; k < t.bn; ++k)
    if (cm[k] != neg_inf<T>()) lowest = std::min(lowest, cm[k]);
  if (C == neg_inf<T>()) return true;  // nothing to sum
  if (!(C - lowest <= T(SHARED_EXP_SPAN))) return false;  // NaN fails too
  std::fill(cs, cs + t.bn, T(0));
  for (int32_t r = 0; r < static_cast<int32_t>(t.bm); ++r) {
    const T* x = (SCALED ? S : A) + r * t.bn;
    const auto [kp, ks] = excluded_columns(p, t, t.r0 + r);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int32_t k = 0; k < bn; ++k) {
      const T e_all = exp_approx((SCALED ? scale * x[k] : x[k]) - C);
      const T e = ((k == kp) | (k == ks)) ? T(0) : e_all;
      sum += e;
      cs[k] += e;
    }
    if (rm[r] != neg_inf<T>()) state.merge(t.r0 + r, C, sum);
  }
  const int64_t c0 = p.column_offset() + t.k0;
  for (int64_t k = 0; k < t.bn; ++k)
    if (cm[k] != neg_inf<T>()) state.merge(c0 + k, C, cs[k]);
  return true;
}

// Backward of one tile: with C the largest lse_neg of the tile's rows and columns, u_r =
// g_a exp(C - lse_neg[a]) and v_k = g_c exp(C - lse_neg[c]), one e = exp(l - C) per pair gives
// the row side's g_a Q_ak = u_r e and the column side's g_c Q_ca = v_k e (e <= 1, since every
// negative's logit is at most its lse). Writes dL_dS and adds the d_inv_temp sums; returns false
// (nothing written) when the lse_neg of the tile span more than SHARED_EXP_SPAN.
template <typename T, bool SCALED>
bool shared_gradient_tile(const Problem& p, const Tile& t, const T* S, const T* A, T scale,
                          const T* lse_neg, const T* g, std::vector<T>& u, std::vector<T>& v,
                          T* dL_dS, T* d_inv_temp) {
  const int64_t c0 = p.column_offset() + t.k0;
  const T* lse_r = lse_neg + t.r0;
  const T* lse_c = lse_neg + c0;
  T C = neg_inf<T>(), lowest = std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < t.bm; ++r) C = std::max(C, lse_r[r]), lowest = std::min(lowest, lse_r[r]);
  for (int64_t k = 0; k < t.bn; ++k) C = std::max(C, lse_c[k]), lowest = std::min(lowest, lse_c[k]);
  // lse_neg = -inf (an empty Neg: a 1 x 1 problem) or NaN: the two-exponential passes handle it.
  if (!(C - lowest <= T(SHARED_EXP_SPAN))) return false;
  for (int64_t r = 0; r < t.bm; ++r) u[r] = g[t.r0 + r] * std::exp(C - lse_r[r]);
  for (int64_t k = 0; k < t.bn; ++k) v[k] = g[c0 + k] * std::exp(C - lse_c[k]);
  const T artanh_scale = T(p.artanh_scale), artanh_eps = T(p.artanh_eps);
  const int32_t bn = static_cast<int32_t>(t.bn);
  const T* vk = v.data();
  T* d_inv_temp_c = (SCALED && d_inv_temp) ? d_inv_temp + c0 : nullptr;
  for (int32_t r = 0; r < static_cast<int32_t>(t.bm); ++r) {
    const T* s = S + r * t.bn;
    const T* x = (SCALED ? S : A) + r * t.bn;
    T* out = dL_dS + r * t.bn;
    const auto [kp, ks] = excluded_columns(p, t, t.r0 + r);  // the columns' exclusions too
    const T u_r = u[r];
    if (d_inv_temp_c) {
      T row_scale_sum = 0;
#pragma omp simd reduction(+ : row_scale_sum)
      for (int32_t k = 0; k < bn; ++k) {
        const T e_all = exp_approx(scale * x[k] - C);
        const T e = ((k == kp) | (k == ks)) ? T(0) : e_all;
        const T q_row = u_r * e, q_col = vk[k] * e;
        row_scale_sum += q_row * s[k];
        d_inv_temp_c[k] += q_col * s[k];
        out[k] = (q_row + q_col) * scale;
      }
      d_inv_temp[t.r0 + r] += row_scale_sum;
    } else {
#pragma omp simd
      for (int32_t k = 0; k < bn; ++k) {
        const T e_all = exp_approx((SCALED ? scale * x[k] : x[k]) - C);
        const T e = ((k == kp) | (k == ks)) ? T(0) : e_all;
        out[k] = (u_r + vk[k]) * e *
                 (SCALED ? scale : artanh_slope(s[k], artanh_scale, artanh_eps));
      }
    }
  }
  return true;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward_impl(const Problem& p, const at::Tensor& anchors,
                                                const at::Tensor& candidates, const T* inv_temp,
                                                bool need_eqs) {
  const auto tiles = p.tiles();
  const bool shared = !need_eqs && shared_exp_problem(p, inv_temp);
  const T* anchors_data = anchors.data_ptr<T>();
  const T* candidates_data = candidates.data_ptr<T>();
  // The known shift's bounds (see SHIFT_MIN_SUM; scaled map only): the norms of the anchors and
  // of the candidates, once per call (O((M + K) D)).
  const bool use_known_shift = p.scaled();
  const std::vector<T> anchor_norm =
      use_known_shift ? row_norms(anchors_data, p.M, p.D) : std::vector<T>();
  const std::vector<T> candidate_norm = !use_known_shift   ? std::vector<T>()
                                        : p.symmetric ? anchor_norm
                                                      : row_norms(candidates_data, p.K, p.D);
  std::vector<OnlineLse<T>> states(at::get_num_threads(), OnlineLse<T>(p.num_lse(), need_eqs));
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    OnlineLse<T>& state = states[at::get_thread_num()];
    std::vector<T> S_buf(BLOCK * BLOCK), artanh_S(p.scaled() ? 0 : BLOCK * BLOCK);
    std::vector<T> col_max(BLOCK), col_sum(BLOCK), col_sum_s(need_eqs ? BLOCK : 0);
    std::vector<T> row_max(shared ? BLOCK : 0);
    std::vector<T> row_bound(use_known_shift ? BLOCK : 0), col_bound(use_known_shift ? BLOCK : 0);
    ColumnExclusions exclusions;
    TileLabels labels;
    for (int64_t q = begin; q < end; ++q) {
      const Tile t = make_tile(p, tiles[q].first, tiles[q].second);
      const T* S = tile_similarity(anchors_data, candidates_data, t, p.D, S_buf);
      if (!p.scaled()) artanh_logits(p, S, t.bm * t.bn, artanh_S.data());

      // The tile's bounds: row r's logits are at most |inv_temp[a]| |u_a| max_k |v_k|, column
      // k's (as an anchor) at most |inv_temp[c]| |v_k| max_r |u_r|.
      if (use_known_shift) {
        const T row_norm_max = max_norm(anchor_norm, t.r0, t.bm);
        const T col_norm_max = max_norm(candidate_norm, t.k0, t.bn);
        for (int64_t r = 0; r < t.bm; ++r)
          row_bound[r] = std::abs(inv_temp[t.r0 + r]) * anchor_norm[t.r0 + r] * col_norm_max;
        if (t.mirrored) {
          const int64_t c0 = p.column_offset() + t.k0;
          for (int64_t k = 0; k < t.bn; ++k)
            col_bound[k] = std::abs(inv_temp[c0 + k]) * candidate_norm[t.k0 + k] * row_norm_max;
        }
      }
      const T* rb = use_known_shift ? row_bound.data() : nullptr;
      const T* cb = use_known_shift ? col_bound.data() : nullptr;

      const T* A = artanh_S.data();
      if (shared && t.mirrored) {  // one exponential per pair for both directions, in range
        if (use_known_shift && shared_forward_tile_known(p, t, S, inv_temp[0], rb, cb, col_sum,
                                                     row_max, state))
          continue;
        const bool done =
            p.scaled() ? shared_forward_tile<T, true>(p, t, S, A, inv_temp[0], col_max, col_sum,
                                                      row_max, state)
                       : shared_forward_tile<T, false>(p, t, S, A, T(1), col_max, col_sum,
                                                       row_max, state);
        if (done) continue;
      }
      labels.fill(p, t);
      // One instantiation per (logit map, label mask): the flags are template parameters, so
      // the vector loops carry no branch for them.
      if (p.scaled()) {
        if (p.anchor_labels)
          forward_tile<T, true, true>(p, t, S, A, inv_temp, rb, cb, exclusions, labels, need_eqs,
                                      col_max, col_sum, col_sum_s, state);
        else
          forward_tile<T, true, false>(p, t, S, A, inv_temp, rb, cb, exclusions, labels, need_eqs,
                                       col_max, col_sum, col_sum_s, state);
      } else {
        if (p.anchor_labels)
          forward_tile<T, false, true>(p, t, S, A, inv_temp, nullptr, nullptr, exclusions,
                                       labels, need_eqs, col_max, col_sum, col_sum_s, state);
        else
          forward_tile<T, false, false>(p, t, S, A, inv_temp, nullptr, nullptr, exclusions,
                                        labels, need_eqs, col_max, col_sum, col_sum_s, state);
      }
    }
  });
  at::Tensor lse_neg = at::empty({p.num_lse()}, anchors.options());
  at::Tensor eqs = need_eqs ? at::empty({p.num_lse()}, anchors.options()) : at::Tensor();
  T* out = lse_neg.data_ptr<T>();
  T* out_eqs = need_eqs ? eqs.data_ptr<T>() : nullptr;
  at::parallel_for(0, p.num_lse(), 2048, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      T m = neg_inf<T>();
      for (const auto& st : states) m = std::max(m, st.max[a]);
      T s = 0, ts = 0;
      for (const auto& st : states)
        if (st.max[a] != neg_inf<T>()) {
          const T scale = std::exp(st.max[a] - m);
          s += st.sum[a] * scale;
          if (out_eqs) ts += st.sum_s[a] * scale;
        }
      out[a] = m + std::log(s);  // -inf for an anchor without negatives
      if (out_eqs) out_eqs[a] = s > T(0) ? ts / s : T(0);  // 0 for an empty Neg(a)
    }
  });
  return {lse_neg, eqs};
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
    // Only when wanted: K x D per thread (a 65536-row memory bank: 32 MiB per thread).
    if (!p.symmetric && need_d_candidates)
      d_candidates_th[th] = at::zeros({p.K, p.D}, anchors.options());
    if (need_d_inv_temp) d_inv_temp_th[th].assign(p.num_lse(), T(0));
  }
  const bool shared = shared_exp_problem(p, inv_temp);
  const T* anchors_data = anchors.data_ptr<T>();
  const T* candidates_data = candidates.data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    const int th = at::get_thread_num();
    std::vector<T> S_buf(BLOCK * BLOCK), dL_dS_buf(BLOCK * BLOCK),
        artanh_S(p.scaled() ? 0 : BLOCK * BLOCK);
    std::vector<T> u(shared ? BLOCK : 0), v(shared ? BLOCK : 0);
    ColumnExclusions exclusions;
    TileLabels labels;
    T* d_inv_temp = need_d_inv_temp ? d_inv_temp_th[th].data() : nullptr;
    for (int64_t q = begin; q < end; ++q) {
      const Tile t = make_tile(p, tiles[q].first, tiles[q].second);
      const T* S = tile_similarity(anchors_data, candidates_data, t, p.D, S_buf);
      if (!p.scaled()) artanh_logits(p, S, t.bm * t.bn, artanh_S.data());
      T* dL_dS_data = dL_dS_buf.data();

      // Row side: dL_dS = dL_dl_row * dl_dS; column side (mirrored tile): dL_dS += dL_dl_col *
      // dl_dS, both in S's layout.
      const T* A = artanh_S.data();
      const bool done =
          shared && t.mirrored &&
          (p.scaled() ? shared_gradient_tile<T, true>(p, t, S, A, inv_temp[0], lse_neg, g, u, v,
                                                       dL_dS_data, d_inv_temp)
                      : shared_gradient_tile<T, false>(p, t, S, A, T(1), lse_neg, g, u, v,
                                                        dL_dS_data, d_inv_temp));
      if (!done) labels.fill(p, t);
      if (done) {
        // one exponential per pair wrote dL_dS and the d_inv_temp sums
      } else if (p.scaled()) {
        if (p.anchor_labels)
          gradient_tile<T, true, true>(p, t, S, A, inv_temp, lse_neg, g, exclusions, labels,
                                       dL_dS_data, d_inv_temp);
        else
          gradient_tile<T, true, false>(p, t, S, A, inv_temp, lse_neg, g, exclusions, labels,
                                        dL_dS_data, d_inv_temp);
      } else {
        if (p.anchor_labels)
          gradient_tile<T, false, true>(p, t, S, A, inv_temp, lse_neg, g, exclusions, labels,
                                        dL_dS_data, d_inv_temp);
        else
          gradient_tile<T, false, false>(p, t, S, A, inv_temp, lse_neg, g, exclusions, labels,
                                         dL_dS_data, d_inv_temp);
      }
      // d_anchors_r += dL_dS candidates_k; d_candidates_k += dL_dS^T anchors_r (symmetric:
      // both into d_anchors).
      const T* anchors_r = anchors_data + t.r0 * p.D;
      const T* candidates_k = candidates_data + t.k0 * p.D;
      if (p.symmetric || need_d_anchors)
        gemm_rows(dL_dS_data, t.bm, t.bn, candidates_k, p.D,
                  d_anchors_th[th].data_ptr<T>() + t.r0 * p.D);
      if (p.symmetric) {
        gemm_columns(dL_dS_data, t.bm, t.bn, anchors_r, p.D,
                     d_anchors_th[th].data_ptr<T>() + t.k0 * p.D);
      } else if (need_d_candidates) {
        gemm_columns(dL_dS_data, t.bm, t.bn, anchors_r, p.D,
                     d_candidates_th[th].data_ptr<T>() + t.k0 * p.D);
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

// ---------------------------------------------------------------------------------------------
// RowReduction::Softplus (cross problems, Scaled map): the same tiles, plain per-row sums.
// ---------------------------------------------------------------------------------------------

// The logits of a tile's rows, l = inv_temp[a] S_ak + row_bias[a], excluded pairs -inf.
template <typename T>
void softplus_logits(const Problem& p, const Tile& t, const T* S, const T* inv_temp,
                     const T* row_bias, T* L) {
  const int32_t bn = static_cast<int32_t>(t.bn);
  for (int64_t r = 0; r < t.bm; ++r) {
    const int64_t a = t.r0 + r;
    const auto [kp, ks] = excluded_columns(p, t, a);
    const T* s = S + r * t.bn;
    T* l = L + r * t.bn;
    const T inv_temp_a = inv_temp[a], bias = row_bias ? row_bias[a] : T(0);
#pragma omp simd
    for (int32_t k = 0; k < bn; ++k) {
      const T l_all = inv_temp_a * s[k] + bias;
      l[k] = ((k == kp) | (k == ks)) ? neg_inf<T>() : l_all;
    }
  }
}

// One tile of a softplus pass: its rows' and columns' first rows, S (into S_buf) and the logits
// (into L).
template <typename T>
struct SoftplusTile {
  Tile t;
  const T* anchors_r;
  const T* candidates_k;
  const T* S;
};

template <typename T>
SoftplusTile<T> softplus_tile(const Problem& p, int64_t i, int64_t j, const T* anchors,
                              const T* candidates, const T* inv_temp, const T* row_bias,
                              std::vector<T>& S_buf, std::vector<T>& L) {
  const Tile t = make_tile(p, i, j);
  const T* S = tile_similarity(anchors, candidates, t, p.D, S_buf);
  softplus_logits(p, t, S, inv_temp, row_bias, L.data());
  return {t, anchors + t.r0 * p.D, candidates + t.k0 * p.D, S};
}

// The K x D sum over rows that a thread owning row blocks accumulates the candidate side into:
// the output itself for thread 0, a zeroed buffer of its own for every other thread;
// merge_thread_sums adds the buffers in thread order (deterministic, no atomics).
inline at::Tensor thread_sum(int th, const at::Tensor& output, std::vector<at::Tensor>& buffers) {
  if (th == 0) return output;
  buffers[th] = at::zeros_like(output);
  return buffers[th];
}

inline void merge_thread_sums(at::Tensor& output, const std::vector<at::Tensor>& buffers) {
  for (size_t th = 1; th < buffers.size(); ++th)
    if (buffers[th].defined()) output.add_(buffers[th]);
}

// Forward; with_grads: also the gradients' tile sums, so that a backward with a uniform upstream
// gradient (a mean or a sum) needs no second pass (3 GEMMs in all, the minimum). With
// W_ak = inv_temp[a] sigmoid(l_ak) on Neg(a), 0 elsewhere, it returns, flat in one tensor,
//   E[a, :] = sum_k W_ak candidates[k]     (d_anchors = g_a E)                 [M, D]
//   sigmoid_sum[a] = sum_k sigmoid(l_ak)   (d_row_bias = g_a sigmoid_sum)      [M]
//   sigmoid_S[a] = sum_k sigmoid(l_ak) S_ak (d_inv_temp = g_a sigmoid_S)       [M]
//   F[k, :] = sum_a W_ak anchors[a]        (d_candidates = c F when g = c)    [K, D]
template <typename T>
std::tuple<at::Tensor, at::Tensor> softplus_forward_impl(const Problem& p,
                                                         const at::Tensor& anchors,
                                                         const at::Tensor& candidates,
                                                         const T* inv_temp, const T* row_bias,
                                                         bool with_grads) {
  // Each thread owns whole row blocks (all their tiles, in column order), so the row-side
  // results (sp_neg, E, the two sigmoid sums) are written straight into the outputs with a
  // summation order that does not depend on the thread count. Only F sums over rows: thread 0
  // accumulates into the output's F, every other thread that gets work into a K x D buffer of
  // its own, added in thread order at the end (no atomics, the same bits for a given thread
  // count). Extra memory beyond the outputs: (threads - 1) K D, plus two tiles per thread.
  const int64_t blocks_m = p.blocks_m(), blocks_k = p.blocks_k();
  const int num_threads = at::get_num_threads();
  at::Tensor sp_neg = at::zeros({p.M}, anchors.options());
  T* sp_out = sp_neg.data_ptr<T>();
  at::Tensor aux, E, F;
  T *sig_sum_out = nullptr, *sig_S_out = nullptr;
  std::vector<at::Tensor> F_th(num_threads);
  const T* anchors_data = anchors.data_ptr<T>();
  const T* candidates_data = candidates.data_ptr<T>();
  if (with_grads) {
    aux = at::zeros({p.M * p.D + 2 * p.M + p.K * p.D}, anchors.options());
    E = aux.narrow(0, 0, p.M * p.D).view({p.M, p.D});
    F = aux.narrow(0, p.M * p.D + 2 * p.M, p.K * p.D).view({p.K, p.D});
    sig_sum_out = aux.data_ptr<T>() + p.M * p.D;
    sig_S_out = sig_sum_out + p.M;
  }
  at::parallel_for(0, blocks_m, 1, [&](int64_t begin, int64_t end) {
    const at::Tensor F_mine = with_grads ? thread_sum(at::get_thread_num(), F, F_th) : F;
    std::vector<T> S_buf(BLOCK * BLOCK), L(BLOCK * BLOCK);
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < blocks_k; ++j) {
        const auto [t, anchors_r, candidates_k, S] = softplus_tile(
            p, i, j, anchors_data, candidates_data, inv_temp, row_bias, S_buf, L);
        for (int64_t r = 0; r < t.bm; ++r) {
          const int64_t a = t.r0 + r;
          T* l = L.data() + r * t.bn;
          T s = 0;
          if (!with_grads) {
#pragma omp simd reduction(+ : s)
            for (int64_t k = 0; k < t.bn; ++k) s += softplus_stable(l[k]);
            sp_out[a] += s;
            continue;
          }
          // softplus and sigmoid from one e = e^-|l|; l becomes W = inv_temp[a] sigmoid(l) in
          // place, after the row's sums.
          const T* s_row = S + r * t.bn;
          const T inv_temp_a = inv_temp[a];
          T sig_sum = 0, sig_S = 0;
#pragma omp simd reduction(+ : s, sig_sum, sig_S)
          for (int64_t k = 0; k < t.bn; ++k) {
            const T x = l[k];
            const T e = exp_approx(-std::abs(x));
            s += (x < T(0) ? T(0) : x) + log1p_unit(e);
            const T inv = T(1) / (T(1) + e);
            const T sig = x >= T(0) ? inv : (x < T(0) ? e * inv : x);
            sig_sum += sig;
            sig_S += sig * s_row[k];
            l[k] = inv_temp_a * sig;
          }
          sp_out[a] += s;
          sig_sum_out[a] += sig_sum;
          sig_S_out[a] += sig_S;
        }
        if (!with_grads) continue;
        gemm_rows(L.data(), t.bm, t.bn, candidates_k, p.D, E.data_ptr<T>() + t.r0 * p.D);
        gemm_columns(L.data(), t.bm, t.bn, anchors_r, p.D, F_mine.data_ptr<T>() + t.k0 * p.D);
      }
    }
  });
  if (!with_grads) return {sp_neg, at::Tensor()};
  merge_thread_sums(F, F_th);
  return {sp_neg, aux};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softplus_backward_impl(
    const Problem& p, const at::Tensor& anchors, const at::Tensor& candidates,
    const T* inv_temp, const T* row_bias, const T* g, bool need_d_anchors,
    bool need_d_candidates, bool need_d_inv_temp, bool need_d_row_bias) {
  // Row blocks owned by threads, as in softplus_forward_impl: the row-side gradients go straight
  // into the outputs; d_candidates into thread 0's output and the other threads' K x D buffers.
  const int64_t blocks_m = p.blocks_m(), blocks_k = p.blocks_k();
  const int num_threads = at::get_num_threads();
  at::Tensor d_anchors, d_candidates, d_inv_temp, d_row_bias;
  if (need_d_anchors) d_anchors = at::zeros({p.M, p.D}, anchors.options());
  if (need_d_candidates) d_candidates = at::zeros({p.K, p.D}, anchors.options());
  if (need_d_inv_temp) d_inv_temp = at::zeros({p.M}, anchors.options());
  if (need_d_row_bias) d_row_bias = at::zeros({p.M}, anchors.options());
  T* d_inv_temp_out = need_d_inv_temp ? d_inv_temp.data_ptr<T>() : nullptr;
  T* d_row_bias_out = need_d_row_bias ? d_row_bias.data_ptr<T>() : nullptr;
  std::vector<at::Tensor> d_candidates_th(num_threads);
  const T* anchors_data = anchors.data_ptr<T>();
  const T* candidates_data = candidates.data_ptr<T>();
  at::parallel_for(0, blocks_m, 1, [&](int64_t begin, int64_t end) {
    const at::Tensor d_candidates_mine =
        need_d_candidates ? thread_sum(at::get_thread_num(), d_candidates, d_candidates_th)
                          : d_candidates;
    std::vector<T> S_buf(BLOCK * BLOCK), L(BLOCK * BLOCK);
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < blocks_k; ++j) {
        const auto [t, anchors_r, candidates_k, S] = softplus_tile(
            p, i, j, anchors_data, candidates_data, inv_temp, row_bias, S_buf, L);
        // L becomes dL_dS = g_a sigmoid(l) inv_temp[a] in place, row by row.
        for (int64_t r = 0; r < t.bm; ++r) {
          const int64_t a = t.r0 + r;
          T* l = L.data() + r * t.bn;
          const T* s = S + r * t.bn;
          const T g_a = g[a];
#pragma omp simd
          for (int64_t k = 0; k < t.bn; ++k) l[k] = g_a * sigmoid_stable(l[k]);
          if (need_d_inv_temp) {
            T acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t k = 0; k < t.bn; ++k) acc += l[k] * s[k];
            d_inv_temp_out[a] += acc;
          }
          if (need_d_row_bias) {
            T acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t k = 0; k < t.bn; ++k) acc += l[k];
            d_row_bias_out[a] += acc;
          }
          const T inv_temp_a = inv_temp[a];
#pragma omp simd
          for (int64_t k = 0; k < t.bn; ++k) l[k] *= inv_temp_a;
        }
        if (need_d_anchors)
          gemm_rows(L.data(), t.bm, t.bn, candidates_k, p.D, d_anchors.data_ptr<T>() + t.r0 * p.D);
        if (need_d_candidates)
          gemm_columns(L.data(), t.bm, t.bn, anchors_r, p.D,
                       d_candidates_mine.data_ptr<T>() + t.k0 * p.D);
      }
    }
  });
  if (need_d_candidates) merge_thread_sums(d_candidates, d_candidates_th);
  return {d_anchors, d_candidates, d_inv_temp, d_row_bias};
}

// The softplus reduction's extra argument and restrictions (Python's _ops checks them first).
void check_softplus(const Problem& p, const at::Tensor& anchors,
                    const c10::optional<at::Tensor>& row_bias) {
  TORCH_CHECK(p.scaled() && !p.symmetric,
              "the softplus row reduction takes the scaled map and distinct candidates");
  if (row_bias.has_value()) {
    TORCH_CHECK(row_bias->numel() == p.M && row_bias->is_contiguous() &&
                    row_bias->scalar_type() == anchors.scalar_type(),
                "row_bias must be a contiguous [M] tensor of the anchors' dtype");
  }
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
                     bool both_directions, const c10::optional<at::Tensor>& anchor_labels,
                     const c10::optional<at::Tensor>& candidate_labels) {
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
  TORCH_CHECK(anchor_labels.has_value() == candidate_labels.has_value(),
              "anchor_labels and candidate_labels go together");
  if (anchor_labels.has_value()) {
    TORCH_CHECK(anchor_labels->scalar_type() == at::kLong && anchor_labels->is_contiguous() &&
                    anchor_labels->numel() == anchors.size(0),
                "anchor_labels must be a contiguous int64 [M] tensor");
    TORCH_CHECK(candidate_labels->scalar_type() == at::kLong &&
                    candidate_labels->is_contiguous() &&
                    candidate_labels->numel() == candidates.size(0),
                "candidate_labels must be a contiguous int64 [K] tensor");
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
          self_index.has_value() ? self_index->data_ptr<int64_t>() : nullptr,
          anchor_labels.has_value() ? anchor_labels->data_ptr<int64_t>() : nullptr,
          candidate_labels.has_value() ? candidate_labels->data_ptr<int64_t>() : nullptr};
}

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& anchors, const at::Tensor& candidates,
    const c10::optional<at::Tensor>& inv_temp, const at::Tensor& pos_index,
    const c10::optional<at::Tensor>& self_index, int64_t logit_map, double artanh_scale,
    double artanh_eps, bool symmetric, bool both_directions,
    const c10::optional<at::Tensor>& anchor_labels,
    const c10::optional<at::Tensor>& candidate_labels, bool need_eqs) {
  const Problem p = make_problem(anchors, candidates, inv_temp, pos_index, self_index, logit_map,
                                 artanh_scale, artanh_eps, symmetric, both_directions,
                                 anchor_labels, candidate_labels);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(anchors.scalar_type(), "macl_cpu_forward", [&] {
    // detach: the kernels read raw pointers (autograd is the caller's business: the custom
    // op's registered backward).
    out = forward_impl<scalar_t>(p, anchors.detach(), candidates.detach(),
                                 p.scaled() ? inv_temp->data_ptr<scalar_t>() : nullptr,
                                 need_eqs);
  });
  return out;
}

// The softplus reduction's forward: (sp_neg, aux), aux the gradients' tile sums when with_grads
// (see softplus_forward_impl), else undefined.
std::tuple<at::Tensor, at::Tensor> softplus_forward(
    const at::Tensor& anchors, const at::Tensor& candidates, const at::Tensor& inv_temp,
    const c10::optional<at::Tensor>& row_bias, const at::Tensor& pos_index,
    const c10::optional<at::Tensor>& self_index, bool with_grads) {
  const Problem p = make_problem(anchors, candidates, inv_temp, pos_index, self_index,
                                 static_cast<int64_t>(LogitMap::Scaled), 0.0, 0.0, false, false,
                                 c10::nullopt, c10::nullopt);
  check_softplus(p, anchors, row_bias);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(anchors.scalar_type(), "macl_cpu_softplus_forward", [&] {
    out = softplus_forward_impl<scalar_t>(
        p, anchors.detach(), candidates.detach(), inv_temp.data_ptr<scalar_t>(),
        row_bias.has_value() ? row_bias->data_ptr<scalar_t>() : nullptr, with_grads);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& anchors, const at::Tensor& candidates,
    const c10::optional<at::Tensor>& inv_temp, const at::Tensor& pos_index,
    const c10::optional<at::Tensor>& self_index, const at::Tensor& lse_neg, const at::Tensor& g,
    int64_t logit_map, double artanh_scale, double artanh_eps, bool symmetric,
    bool both_directions, bool need_d_anchors, bool need_d_candidates, bool need_d_inv_temp,
    const c10::optional<at::Tensor>& anchor_labels,
    const c10::optional<at::Tensor>& candidate_labels) {
  const Problem p = make_problem(anchors, candidates, inv_temp, pos_index, self_index, logit_map,
                                 artanh_scale, artanh_eps, symmetric, both_directions,
                                 anchor_labels, candidate_labels);
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

// The softplus reduction's recompute backward (needs no forward statistic): the gradients of
// sum_a g[a] sp_neg[a], (d_anchors, d_candidates, d_inv_temp, d_row_bias), undefined where not
// needed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softplus_backward(
    const at::Tensor& anchors, const at::Tensor& candidates, const at::Tensor& inv_temp,
    const c10::optional<at::Tensor>& row_bias, const at::Tensor& pos_index,
    const c10::optional<at::Tensor>& self_index, const at::Tensor& g, bool need_d_anchors,
    bool need_d_candidates, bool need_d_inv_temp, bool need_d_row_bias) {
  const Problem p = make_problem(anchors, candidates, inv_temp, pos_index, self_index,
                                 static_cast<int64_t>(LogitMap::Scaled), 0.0, 0.0, false, false,
                                 c10::nullopt, c10::nullopt);
  check_softplus(p, anchors, row_bias);
  TORCH_CHECK(g.is_contiguous() && g.numel() == p.M && g.scalar_type() == anchors.scalar_type(),
              "g must be a contiguous [M] tensor of the anchors' dtype");
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(anchors.scalar_type(), "macl_cpu_softplus_backward", [&] {
    out = softplus_backward_impl<scalar_t>(
        p, anchors.detach(), candidates.detach(), inv_temp.data_ptr<scalar_t>(),
        row_bias.has_value() ? row_bias->data_ptr<scalar_t>() : nullptr, g.data_ptr<scalar_t>(),
        need_d_anchors, need_d_candidates, need_d_inv_temp,
        need_d_row_bias && row_bias.has_value());
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "macl-kernels fused CPU kernels (tiled, OpenMP via at::parallel_for)";
#ifdef MACL_BUILT_WITH_TORCH
  m.attr("built_with_torch") = MACL_BUILT_WITH_TORCH;  // so a mismatch can be named on load
#endif
  m.def("forward", &forward,
        "(lse_neg, eqs) of every anchor row; eqs is None unless need_eqs",
        py::arg("anchors"), py::arg("candidates"), py::arg("inv_temp"), py::arg("pos_index"),
        py::arg("self_index"), py::arg("logit_map"), py::arg("artanh_scale"),
        py::arg("artanh_eps"), py::arg("symmetric"), py::arg("both_directions") = false,
        py::arg("anchor_labels") = py::none(), py::arg("candidate_labels") = py::none(),
        py::arg("need_eqs") = false);
  m.def("softplus_forward", &softplus_forward,
        "sp_neg of every anchor row (sum of softplus over Neg(a)) and, with_grads, the "
        "gradients' tile sums [E (M x D) | sum sigmoid (M) | sum sigmoid S (M) | F (K x D)]",
        py::arg("anchors"), py::arg("candidates"), py::arg("inv_temp"), py::arg("row_bias"),
        py::arg("pos_index"), py::arg("self_index"), py::arg("with_grads"));
  m.def("backward", &backward,
        "gradients of sum_a g[a] lse_neg[a]: (d_anchors, d_candidates, d_inv_temp); "
        "symmetric: d_anchors is the whole gradient and d_candidates is None",
        py::arg("anchors"), py::arg("candidates"), py::arg("inv_temp"), py::arg("pos_index"),
        py::arg("self_index"), py::arg("lse_neg"), py::arg("g"), py::arg("logit_map"),
        py::arg("artanh_scale"), py::arg("artanh_eps"), py::arg("symmetric"),
        py::arg("both_directions"), py::arg("need_d_anchors"), py::arg("need_d_candidates"),
        py::arg("need_d_inv_temp"), py::arg("anchor_labels") = py::none(),
        py::arg("candidate_labels") = py::none());
  m.def("softplus_backward", &softplus_backward,
        "gradients of sum_a g[a] sp_neg[a]: (d_anchors, d_candidates, d_inv_temp, d_row_bias)",
        py::arg("anchors"), py::arg("candidates"), py::arg("inv_temp"), py::arg("row_bias"),
        py::arg("pos_index"), py::arg("self_index"), py::arg("g"), py::arg("need_d_anchors"),
        py::arg("need_d_candidates"), py::arg("need_d_inv_temp"), py::arg("need_d_row_bias"));
}
