// Fused CPU kernels for the contrastive primitive (backend "cpu"); the math is docs/math.md,
// section "The primitive", in the names of the glossary that Python, Triton and CUDA share.
// The interface (raw pointers, a Problem) is macl_cpu.h; the torch binding, which checks and
// converts tensors and allocates the outputs, is binding.cpp.
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
// BLAS GEMM (sgemm_ / dgemm_, see blas_gemm), its exponentials from a branch-free polynomial exp
// that the compiler vectorises, and the gradient GEMMs of backward accumulate into per-thread
// buffers summed at the end (no atomics; for a given thread count the result is bitwise
// reproducible).
//
// symmetric (layout 2n on one process: the candidates are the anchors): S is symmetric, so only
// the tiles (i, j) with j >= i are computed. An off-diagonal tile serves the anchors of block i
// (its rows, logits inv_temp[a] S_ak) and those of block j (its columns, logits inv_temp[k]
// S_ak); in backward both sides land in one dL_dS_ij = dL_dS_row + dL_dS_col^T, and
// d_anchors_i += dL_dS_ij anchors_j, d_anchors_j += dL_dS_ij^T anchors_i: half the GEMM work of
// the plain tiling. A diagonal tile already holds every pair of its block as a row. d_anchors is
// then the whole gradient of the one tensor, and there is no d_candidates.
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

#include "macl_cpu.h"

#include <ATen/ATen.h>
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

namespace macl_cpu {
namespace {

// 256 x 256 tiles: one GEMM of 256 x 256 x D per tile keeps the BLAS call overhead small, and
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

int64_t row_blocks(const Problem& p) { return (p.M + BLOCK - 1) / BLOCK; }
int64_t column_blocks(const Problem& p) { return (p.K + BLOCK - 1) / BLOCK; }

// The tiles to compute: every (i, j), or j >= i when symmetric.
std::vector<std::pair<int64_t, int64_t>> tiles_of(const Problem& p) {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t i = 0; i < row_blocks(p); ++i)
    for (int64_t j = p.symmetric ? i : 0; j < column_blocks(p); ++j) out.emplace_back(i, j);
  return out;
}

// A tile: anchor rows r0..r0+bm against candidate rows k0..k0+bn, with
// S = anchors_r candidates_k^T.
struct Tile {
  int64_t i, j, r0, k0, bm, bn;
  bool mirrored;  // the columns are anchors too: symmetric off-diagonal, or both_directions
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

// The gradient GEMMs of one tile, dL_dS [bm, bn] row-major (leading dimension bn); the softplus
// forward passes its W, the dL_dS of a unit g.
// out[rows r0..r0+bm] += dL_dS [bm, bn] x X[rows k0..k0+bn]
template <typename T>
void gemm_rows(const T* dL_dS, int64_t bm, int64_t bn, const T* X_k, int64_t D, T* out_r) {
  blas_gemm<T>(false, false, D, bm, bn, X_k, D, dL_dS, bn, T(1), out_r, D);
}

// out[rows k0..k0+bn] += dL_dS^T [bn, bm] x X[rows r0..r0+bm]
template <typename T>
void gemm_columns(const T* dL_dS, int64_t bm, int64_t bn, const T* X_r, int64_t D, T* out_k) {
  blas_gemm<T>(false, true, D, bn, bm, X_r, D, dL_dS, bn, T(1), out_k, D);
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
// inv_temp[r0 + r] S. Mirrored side (a mirrored tile only): column k0 + k as an anchor (entry
// c = column_offset + k0 + k) against row r0 + r, logit inv_temp[c] S. Indices relative to the
// tile are int32 so that the masks run at the float lanes' width.

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

// The mirrored side's excluded rows of one tile (each column's positive and self among the
// anchors), relative to the tile.
struct MirroredExclusions {
  std::vector<int32_t> pos, self;
  MirroredExclusions() : pos(BLOCK), self(BLOCK) {}
  void fill(const Problem& p, const Tile& t) {
    const int64_t c0 = p.column_offset() + t.k0;
    for (int64_t k = 0; k < t.bn; ++k) {
      pos[k] = tile_position(p.pos_index[c0 + k], t.r0, t.bm);
      self[k] = p.self_index ? tile_position(p.self_index[c0 + k], t.r0, t.bm) : -1;
    }
  }
};

// The labels of one tile's rows and columns (the label mask): a pair whose row and column carry
// the same label is not a negative of either (the condition is symmetric, so one comparison
// serves the row side and the mirrored side). Only filled when the problem has labels.
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
// thread's online state; with need_eqs also sum exp(l - m) S (for eqs). m is the row's known
// shift (SCALED only, row_bound given) when its sum passes the check, else the row's max in the
// tile.
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

// Forward, mirrored side: each column's partial (m, sum) over the tile's rows (and eqs' sum),
// m the column's known shift (SCALED only, col_bound given) where its sum passes the check,
// else its max over the tile's rows (a second pass for the columns that failed).
template <typename T, bool SCALED, bool LABELS>
void mirrored_statistics(const Problem& p, const Tile& t, const T* S, const T* A,
                         const T* inv_temp, const T* col_bound, MirroredExclusions& ex,
                         const TileLabels& labels, bool need_eqs, std::vector<T>& col_max,
                         std::vector<T>& col_sum, std::vector<T>& col_sum_s,
                         OnlineLse<T>& state) {
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

// Backward, mirrored side: dL_dS_ak += g_c Q_ca dl_dS (c the column's entry), and
// d_inv_temp[c] += sum_a g_c Q_ca S_ak.
template <typename T, bool SCALED, bool LABELS>
void mirrored_gradient(const Problem& p, const Tile& t, const T* S, const T* A,
                       const T* inv_temp, const T* lse_neg, const T* g, MirroredExclusions& ex,
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

// Both sides of one tile (the mirrored side only for a mirrored tile), forward and backward.
template <typename T, bool SCALED, bool LABELS>
void forward_tile(const Problem& p, const Tile& t, const T* S, const T* A, const T* inv_temp,
                  const T* row_bound, const T* col_bound, MirroredExclusions& ex,
                  const TileLabels& labels, bool need_eqs, std::vector<T>& col_max,
                  std::vector<T>& col_sum, std::vector<T>& col_sum_s, OnlineLse<T>& state) {
  row_statistics<T, SCALED, LABELS>(p, t, S, A, inv_temp, row_bound, labels, need_eqs, state);
  if (t.mirrored)
    mirrored_statistics<T, SCALED, LABELS>(p, t, S, A, inv_temp, col_bound, ex, labels,
                                           need_eqs, col_max, col_sum, col_sum_s, state);
}

template <typename T, bool SCALED, bool LABELS>
void gradient_tile(const Problem& p, const Tile& t, const T* S, const T* A, const T* inv_temp,
                   const T* lse_neg, const T* g, MirroredExclusions& ex, const TileLabels& labels,
                   T* dL_dS, T* d_inv_temp) {
  row_gradient<T, SCALED, LABELS>(p, t, S, A, inv_temp, lse_neg, g, labels, dL_dS, d_inv_temp);
  if (t.mirrored)
    mirrored_gradient<T, SCALED, LABELS>(p, t, S, A, inv_temp, lse_neg, g, ex, labels, dL_dS,
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
// the row side's g_a Q_ak = u_r e and the mirrored side's g_c Q_ca = v_k e (e <= 1, since every
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
void forward_impl(const Problem& p, const T* anchors_data, const T* candidates_data,
                  const T* inv_temp, T* out, T* out_eqs) {
  const bool need_eqs = out_eqs != nullptr;
  const auto tiles = tiles_of(p);
  const bool shared = !need_eqs && shared_exp_problem(p, inv_temp);
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
    MirroredExclusions exclusions;
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
}

// Per-thread partial sums of one output of n entries, merged in thread order at the end (no
// atomics; for a given thread count the same bits): thread 0 accumulates into the output itself
// (zero-filled by the caller), every other thread that gets work into a zeroed buffer of its own.
template <typename T>
class ThreadSums {
 public:
  ThreadSums(T* output, int64_t n, int num_threads)
      : output_(output), n_(n), buffers_(num_threads) {}
  // Where thread th accumulates; called once per thread, at the start of its share of the work.
  T* mine(int th) {
    if (th == 0) return output_;
    buffers_[th].assign(n_, T(0));
    return buffers_[th].data();
  }
  void merge() {
    for (size_t th = 1; th < buffers_.size(); ++th) {
      if (buffers_[th].empty()) continue;
      const T* in = buffers_[th].data();
      at::parallel_for(0, n_, 32768, [&](int64_t q0, int64_t q1) {
#pragma omp simd
        for (int64_t q = q0; q < q1; ++q) output_[q] += in[q];
      });
    }
  }

 private:
  T* output_;
  int64_t n_;
  std::vector<std::vector<T>> buffers_;
};

template <typename T>
void backward_impl(const Problem& p, const T* anchors_data, const T* candidates_data,
                   const T* inv_temp, const T* lse_neg, const T* g, T* d_anchors_out,
                   T* d_candidates_out, T* d_inv_temp_out) {
  const bool need_d_anchors = p.symmetric || d_anchors_out != nullptr;
  const bool need_d_candidates = !p.symmetric && d_candidates_out != nullptr;
  const bool need_d_inv_temp = p.scaled() && d_inv_temp_out != nullptr;
  const auto tiles = tiles_of(p);
  const int num_threads = at::get_num_threads();
  // Per-thread accumulators of d_anchors (symmetric: the whole gradient), d_candidates (only
  // when wanted: K x D per thread, a 65536-row memory bank is 32 MiB per thread) and
  // d_inv_temp, summed over threads in thread order at the end.
  ThreadSums<T> d_anchors_th(d_anchors_out, need_d_anchors ? p.M * p.D : 0, num_threads);
  ThreadSums<T> d_candidates_th(d_candidates_out, need_d_candidates ? p.K * p.D : 0,
                                num_threads);
  std::vector<std::vector<T>> d_inv_temp_th(num_threads);
  for (int th = 0; th < num_threads; ++th)
    if (need_d_inv_temp) d_inv_temp_th[th].assign(p.num_lse(), T(0));
  const bool shared = shared_exp_problem(p, inv_temp);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    const int th = at::get_thread_num();
    T* d_anchors_mine = need_d_anchors ? d_anchors_th.mine(th) : nullptr;
    T* d_candidates_mine = need_d_candidates ? d_candidates_th.mine(th) : nullptr;
    std::vector<T> S_buf(BLOCK * BLOCK), dL_dS_buf(BLOCK * BLOCK),
        artanh_S(p.scaled() ? 0 : BLOCK * BLOCK);
    std::vector<T> u(shared ? BLOCK : 0), v(shared ? BLOCK : 0);
    MirroredExclusions exclusions;
    TileLabels labels;
    T* d_inv_temp = need_d_inv_temp ? d_inv_temp_th[th].data() : nullptr;
    for (int64_t q = begin; q < end; ++q) {
      const Tile t = make_tile(p, tiles[q].first, tiles[q].second);
      const T* S = tile_similarity(anchors_data, candidates_data, t, p.D, S_buf);
      if (!p.scaled()) artanh_logits(p, S, t.bm * t.bn, artanh_S.data());
      T* dL_dS_data = dL_dS_buf.data();

      // Row side: dL_dS = dL_dl_row * dl_dS; mirrored side (mirrored tile): dL_dS += dL_dl_col *
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
      if (need_d_anchors)
        gemm_rows(dL_dS_data, t.bm, t.bn, candidates_k, p.D, d_anchors_mine + t.r0 * p.D);
      if (p.symmetric) {
        gemm_columns(dL_dS_data, t.bm, t.bn, anchors_r, p.D, d_anchors_mine + t.k0 * p.D);
      } else if (need_d_candidates) {
        gemm_columns(dL_dS_data, t.bm, t.bn, anchors_r, p.D, d_candidates_mine + t.k0 * p.D);
      }
    }
  });
  if (need_d_anchors) d_anchors_th.merge();
  if (need_d_candidates) d_candidates_th.merge();
  if (need_d_inv_temp) {
    for (int th = 0; th < num_threads; ++th)
      for (int64_t a = 0; a < p.num_lse(); ++a) d_inv_temp_out[a] += d_inv_temp_th[th][a];
  }
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

// Forward; with_grads: also the gradients' tile sums, so that a backward with a uniform upstream
// gradient (a mean or a sum) needs no second pass (3 GEMMs in all, the minimum). With
// W_ak = inv_temp[a] sigmoid(l_ak) on Neg(a), 0 elsewhere, it accumulates, flat in aux,
//   E[a, :] = sum_k W_ak candidates[k]     (d_anchors = g_a E)                 [M, D]
//   sigmoid_sum[a] = sum_k sigmoid(l_ak)   (d_row_bias = g_a sigmoid_sum)      [M]
//   sigmoid_S[a] = sum_k sigmoid(l_ak) S_ak (d_inv_temp = g_a sigmoid_S)       [M]
//   F[k, :] = sum_a W_ak anchors[a]        (d_candidates = c F when g = c)    [K, D]
template <typename T>
void softplus_forward_impl(const Problem& p, const T* anchors_data, const T* candidates_data,
                           const T* inv_temp, const T* row_bias, T* sp_out, T* aux) {
  // Each thread owns whole row blocks (all their tiles, in column order), so the row-side
  // results (sp_neg, E, the two sigmoid sums) are written straight into the outputs with a
  // summation order that does not depend on the thread count. Only F sums over rows: thread 0
  // accumulates into the output's F, every other thread that gets work into a K x D buffer of
  // its own, added in thread order at the end (no atomics, the same bits for a given thread
  // count). Extra memory beyond the outputs: (threads - 1) K D, plus two tiles per thread.
  const int64_t blocks_m = row_blocks(p), blocks_k = column_blocks(p);
  const int num_threads = at::get_num_threads();
  const bool with_grads = aux != nullptr;
  T* E = with_grads ? aux : nullptr;
  T* sig_sum_out = with_grads ? aux + p.M * p.D : nullptr;
  T* sig_S_out = with_grads ? sig_sum_out + p.M : nullptr;
  T* F = with_grads ? sig_S_out + p.M : nullptr;
  ThreadSums<T> F_th(F, with_grads ? p.K * p.D : 0, num_threads);
  at::parallel_for(0, blocks_m, 1, [&](int64_t begin, int64_t end) {
    T* F_mine = with_grads ? F_th.mine(at::get_thread_num()) : nullptr;
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
        gemm_rows(L.data(), t.bm, t.bn, candidates_k, p.D, E + t.r0 * p.D);
        gemm_columns(L.data(), t.bm, t.bn, anchors_r, p.D, F_mine + t.k0 * p.D);
      }
    }
  });
  if (with_grads) F_th.merge();
}

template <typename T>
void softplus_backward_impl(const Problem& p, const T* anchors_data, const T* candidates_data,
                            const T* inv_temp, const T* row_bias, const T* g, T* d_anchors,
                            T* d_candidates, T* d_inv_temp_out, T* d_row_bias_out) {
  // Row blocks owned by threads, as in softplus_forward_impl: the row-side gradients go straight
  // into the outputs; d_candidates into thread 0's output and the other threads' K x D buffers.
  const int64_t blocks_m = row_blocks(p), blocks_k = column_blocks(p);
  const int num_threads = at::get_num_threads();
  const bool need_d_anchors = d_anchors != nullptr, need_d_candidates = d_candidates != nullptr,
             need_d_inv_temp = d_inv_temp_out != nullptr,
             need_d_row_bias = d_row_bias_out != nullptr;
  ThreadSums<T> d_candidates_th(d_candidates, need_d_candidates ? p.K * p.D : 0, num_threads);
  at::parallel_for(0, blocks_m, 1, [&](int64_t begin, int64_t end) {
    T* d_candidates_mine =
        need_d_candidates ? d_candidates_th.mine(at::get_thread_num()) : nullptr;
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
          gemm_rows(L.data(), t.bm, t.bn, candidates_k, p.D, d_anchors + t.r0 * p.D);
        if (need_d_candidates)
          gemm_columns(L.data(), t.bm, t.bn, anchors_r, p.D, d_candidates_mine + t.k0 * p.D);
      }
    }
  });
  if (need_d_candidates) d_candidates_th.merge();
}

}  // namespace

// The interface of macl_cpu.h, for float and double.
template <typename T>
void forward(const Problem& p, const T* anchors, const T* candidates, const T* inv_temp,
             T* lse_neg, T* eqs) {
  forward_impl<T>(p, anchors, candidates, inv_temp, lse_neg, eqs);
}

template <typename T>
void backward(const Problem& p, const T* anchors, const T* candidates, const T* inv_temp,
              const T* lse_neg, const T* g, T* d_anchors, T* d_candidates, T* d_inv_temp) {
  backward_impl<T>(p, anchors, candidates, inv_temp, lse_neg, g, d_anchors, d_candidates,
                   d_inv_temp);
}

template <typename T>
void softplus_forward(const Problem& p, const T* anchors, const T* candidates, const T* inv_temp,
                      const T* row_bias, T* sp_neg, T* aux) {
  softplus_forward_impl<T>(p, anchors, candidates, inv_temp, row_bias, sp_neg, aux);
}

template <typename T>
void softplus_backward(const Problem& p, const T* anchors, const T* candidates,
                       const T* inv_temp, const T* row_bias, const T* g, T* d_anchors,
                       T* d_candidates, T* d_inv_temp, T* d_row_bias) {
  softplus_backward_impl<T>(p, anchors, candidates, inv_temp, row_bias, g, d_anchors,
                            d_candidates, d_inv_temp, d_row_bias);
}

#define MACL_CPU_INSTANTIATE(T)                                                                 \
  template void forward<T>(const Problem&, const T*, const T*, const T*, T*, T*);               \
  template void backward<T>(const Problem&, const T*, const T*, const T*, const T*, const T*,   \
                            T*, T*, T*);                                                        \
  template void softplus_forward<T>(const Problem&, const T*, const T*, const T*, const T*, T*, \
                                    T*);                                                        \
  template void softplus_backward<T>(const Problem&, const T*, const T*, const T*, const T*,    \
                                     const T*, T*, T*, T*, T*);
MACL_CPU_INSTANTIATE(float)
MACL_CPU_INSTANTIATE(double)
#undef MACL_CPU_INSTANTIATE

}  // namespace macl_cpu

