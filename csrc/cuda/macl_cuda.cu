// CUDA kernels for the contrastive primitive (backend "cuda"): docs/math.md, section "The
// primitive" (the math, in the names used below), "Numerical hazards" (the artanh
// clamp, the fp16 rounding of dL_dS) and "Tolerances" (what fp16 / bf16 operands cost).
//
// Per anchor row a (anchors [M, D], candidates [K, D], both L2-normalised):
//
//   S_ak = anchors[a] . candidates[k]
//   l_ak = inv_temp[a] * S_ak                                        (MACL_LOGIT_MAP_SCALED)
//        = artanh_scale * artanh(clamp(S_ak, -1 + artanh_eps, 1 - artanh_eps))
//                                                                      (MACL_LOGIT_MAP_ARTANH)
//   Neg(a) = every k but pos_index[a] and self_index[a] (and, with labels, every k with
//            candidate_labels[k] == anchor_labels[a])
//   forward:  lse_neg[a] = log sum_{k in Neg(a)} exp(l_ak)       (online max/sum over tiles)
//   backward: Q_ak  = exp(l_ak - lse_neg[a]) on Neg(a), 0 elsewhere;  g = dL/d lse_neg
//             dL_dl = g_a Q_ak
//             dL_dS = dL_dl * dl_dS   (dl_dS: inv_temp[a], or artanh_scale / (1 - S^2) inside
//                                      the clamp, 0 outside)
//             d_anchors = dL_dS candidates,   d_candidates = dL_dS^T anchors,
//             d_inv_temp[a] = sum_k dL_dl_ak S_ak                       (scaled map only)
//
// One family of kernels, templated on the operand type T (float: CUDA-core FMA tiles; __half /
// __nv_bfloat16: WMMA tensor cores with fp32 accumulation) and on the logit map (LOGIT_MAP, a
// MaclLogitMap). Everything after the GEMM (logits, masks, exp, statistics, gradients) is fp32.
// The M x K matrix is never formed: a thread block owns a 64 x 64 tile of S in shared memory at
// a time. The kernels do not exploit a symmetric S (candidates == anchors): both sides are
// computed, and the caller sums d_anchors + d_candidates.
//
// Passes (M anchors, K candidates, D columns):
//   forward   1 launch: grid (anchor blocks x candidate splits), each block streams its share of
//             candidate tiles and keeps a running max / sum per row (M K D multiply-adds), then
//             a tiny combine kernel merges the per-split (max, sum) pairs. The split keeps the
//             GPU busy when M is small; the partials cost 2 * splits * M floats.
//   backward  1 launch with two kinds of blocks:
//             - anchor blocks (64 anchor rows each) loop over candidate tiles, recompute S, form
//               dL_dS and accumulate d_anchors[rows] += dL_dS candidates_tile and d_inv_temp
//               (2 M K D multiply-adds);
//             - candidate blocks (64 candidate rows each) loop over anchor tiles, recompute S and
//               dL_dS and accumulate d_candidates[rows] += dL_dS^T anchors_tile (2 M K D
//               multiply-adds).
//             Every output element is owned by one thread of one block, so there are no atomics
//             and results are bitwise reproducible. d_anchors / d_candidates are accumulated in
//             global memory (a read-modify-write of a 64 x 32 chunk per tile), which lets D be
//             any size without registers or shared memory growing with D. Extra memory: none
//             beyond the outputs.
//   both directions (MaclProblem.both_directions, layout cross_sym: the columns of S are anchors
//             too; docs/math.md, "Both directions of one S"): both_forward_kernel computes each
//             tile once for the rows' statistics and the columns' per-anchor-block partials (a
//             second combine launch merges them in block order; 2 K cdiv(M, 64) floats);
//             both_backward_kernel's anchor and candidate blocks form both directions' dL_dS
//             from one recompute (M K D + 2 M K D multiply-adds per side, as one direction).
//
// float64 inputs take a separate, plain path (one thread per row, no tiling): correct, not fast.
//
// The softplus row reduction (SigLIP, docs/math.md, section "SigLIP"; scaled map, distinct
// candidates): sibling kernels sharing tile_S, accumulate_tile and the row helpers.
//   l_ak = inv_temp[a] S_ak + row_bias[a];  sp_neg[a] = sum_{k in Neg(a)} softplus(l_ak)
//   forward  as above, but each split keeps a plain per-row sum (no running max); the combine
//            kernel adds the splits in a fixed order.
//   backward dL_dl = g_a sigmoid(l_ak) needs no forward statistic; dL_dS = dL_dl inv_temp[a]; the
//            same anchor and candidate blocks, the anchor blocks also write d_row_bias[a] =
//            sum_k dL_dl_ak. Same GEMM work: forward M K D, backward 3 M K D multiply-adds.
//   softplus(x) = max(x, 0) + log1p(e^-|x|), sigmoid from e^-|x|: no overflow at any |x|.

#include "macl_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace {

using namespace nvcuda;

constexpr int BM = 64;       // anchor rows of a tile
constexpr int BN = 64;       // candidate rows of a tile
constexpr int BK = 32;       // D-chunk of the S GEMM
constexpr int DN = 32;       // D-chunk of the gradient GEMMs (output columns per pass)
constexpr int THREADS = 256;
// Forward aims at about two waves of blocks on an H100 (132 SMs) by splitting the candidates.
constexpr int64_t FORWARD_TARGET_BLOCKS = 264;

static_assert(BM == BN, "the epilogues map 256 threads onto 64 rows x 4 lanes of a square tile");

__host__ __device__ inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Args {
  int64_t M, K, D;
  float artanh_scale, artanh_eps;  // MACL_LOGIT_MAP_ARTANH only
  const float* inv_temp;           // [M], MACL_LOGIT_MAP_SCALED only (nullptr otherwise)
  const int64_t* pos_index;
  const int64_t* self_index;  // nullptr: no self among the candidates
  const int64_t* anchor_labels;     // nullptr: no label mask
  const int64_t* candidate_labels;  // [K]
};

// ---------------------------------------------------------------------------------------------
// Shared memory. fp32: S plus transposed staging tiles for the CUDA-core GEMMs. The +1 padding
// makes the transposed stores conflict-free. Half: WMMA needs 32-byte aligned fragment pointers
// and leading dimensions that are multiples of 16 bytes, hence the +8 / +4 paddings; every
// member size below is a multiple of 32 bytes, so all fragment addresses stay aligned.
// ---------------------------------------------------------------------------------------------
struct alignas(128) SmemF32 {
  float S[BM][BN + 4];  // S, then dL_dS (in place)
  float As[BK][BM + 1];  // staging tile of the anchors (transposed)
  float Cs[BK][BN + 1];  // staging tile of the candidates (transposed)
  float X[BN][DN + 1];  // a 64 x DN chunk of the rows that dL_dS multiplies
};

template <typename T>
struct alignas(128) SmemHalf {
  float S[BM][BN + 4];  // S, then dL_dS in fp32; then reused as R, the 64 x DN gradient chunk
  T Ah[BM][BK + 8];     // staging tile of the anchors
  T Ch[BN][BK + 8];     // staging tile of the candidates
  T dL_dSh[BM][BN + 8];  // dL_dS rounded to T, after scaling by a power of two (see set_scale)
  T Xh[BN][DN + 8];
  float scale[64];      // per output row of the gradient GEMM
  float inv_scale[64];
};

template <typename T>
using Smem = typename std::conditional<std::is_same<T, float>::value, SmemF32, SmemHalf<T>>::type;

static_assert(sizeof(SmemF32) <= 48 * 1024, "static shared memory limit");
static_assert(sizeof(SmemHalf<__half>) <= 48 * 1024, "static shared memory limit");
static_assert(DN + 4 <= BN + 4 && BN * (DN + 4) <= BM * (BN + 4), "R must fit in S");

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// l_ak of S_ak (inv_temp_a: inv_temp[a], scaled map only).
template <MaclLogitMap LOGIT_MAP>
__device__ __forceinline__ float logit(float S_ak, float inv_temp_a, float artanh_scale,
                                       float artanh_eps) {
  if (LOGIT_MAP == MACL_LOGIT_MAP_ARTANH)
    return artanh_scale * atanhf(fminf(fmaxf(S_ak, -1.0f + artanh_eps), 1.0f - artanh_eps));
  return inv_temp_a * S_ak;
}

// dl_dS of S_ak. Artanh: 0 outside the clamp; finite at S = +-1 (self, exact duplicates) so that
// a zero dL_dl never meets an infinite slope (docs/math.md, "Numerical hazards").
template <MaclLogitMap LOGIT_MAP>
__device__ __forceinline__ float dl_dS(float S_ak, float inv_temp_a, float artanh_scale,
                                       float artanh_eps) {
  if (LOGIT_MAP == MACL_LOGIT_MAP_ARTANH)
    return fabsf(S_ak) < 1.0f - artanh_eps
               ? artanh_scale / fmaxf(1.0f - S_ak * S_ak, artanh_eps)
               : 0.0f;
  return inv_temp_a;
}

// Per-row data of anchor a for the epilogues (a row past M is inert: never valid).
struct Row {
  bool ok;
  float inv_temp;
  int64_t pos_index, self_index;
  int64_t label;  // anchor_labels[a] (unused without labels)
};

__device__ __forceinline__ Row load_row(const Args& p, int64_t a) {
  Row r;
  r.ok = a < p.M;
  r.inv_temp = (r.ok && p.inv_temp) ? p.inv_temp[a] : 0.0f;
  r.pos_index = r.ok ? p.pos_index[a] : -1;
  r.self_index = (r.ok && p.self_index) ? p.self_index[a] : -1;
  r.label = (r.ok && p.anchor_labels) ? p.anchor_labels[a] : 0;
  return r;
}

__device__ __forceinline__ bool in_neg(const Args& p, const Row& r, int64_t k) {
  return r.ok && k < p.K && k != r.pos_index && k != r.self_index &&
         (p.anchor_labels == nullptr || p.candidate_labels[k] != r.label);
}

// Without a label mask (the softplus and both-directions kernels: Python never sends them labels).
__device__ __forceinline__ bool in_neg(const Row& r, int64_t k, int64_t K) {
  return r.ok && k < K && k != r.pos_index && k != r.self_index;
}

// ---------------------------------------------------------------------------------------------
// S tile: sm.S[r][k] = anchors[a0 + r] . candidates[c0 + k] (0 outside the matrices). Ends
// synchronised.
// ---------------------------------------------------------------------------------------------
__device__ void tile_S(SmemF32& sm, const float* __restrict__ anchors,
                       const float* __restrict__ candidates, int64_t a0, int64_t c0,
                       const Args& p) {
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  float acc[4][4] = {};
  for (int64_t d0 = 0; d0 < p.D; d0 += BK) {
    // Coalesced along D; zero padding covers ragged rows and a D that is not a multiple of BK.
#pragma unroll
    for (int i = 0; i < BM * BK / THREADS; ++i) {
      const int idx = tid + i * THREADS, r = idx / BK, k = idx % BK;
      const int64_t d = d0 + k, a = a0 + r, c = c0 + r;
      sm.As[k][r] = (a < p.M && d < p.D) ? anchors[a * p.D + d] : 0.0f;
      sm.Cs[k][r] = (c < p.K && d < p.D) ? candidates[c * p.D + d] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < BK; ++k) {
      float a[4], c[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = sm.As[k][ty + 16 * i];
        c[i] = sm.Cs[k][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], c[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) sm.S[ty + 16 * i][tx + 16 * j] = acc[i][j];
  __syncthreads();
}

template <typename T>
__device__ void tile_S(SmemHalf<T>& sm, const T* __restrict__ anchors,
                       const T* __restrict__ candidates, int64_t a0, int64_t c0, const Args& p) {
  const int tid = threadIdx.x, warp = tid / 32;
  // 8 warps over the 4 x 4 grid of 16 x 16 fragments: warp w owns row w / 2, columns 2(w % 2)+{0,1}.
  const int fi = warp / 2, fj0 = (warp % 2) * 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  const T zero = from_float<T>(0.0f);
  for (int64_t d0 = 0; d0 < p.D; d0 += BK) {
#pragma unroll
    for (int i = 0; i < BM * BK / THREADS; ++i) {
      const int idx = tid + i * THREADS, r = idx / BK, k = idx % BK;
      const int64_t d = d0 + k, a = a0 + r, c = c0 + r;
      sm.Ah[r][k] = (a < p.M && d < p.D) ? anchors[a * p.D + d] : zero;
      sm.Ch[r][k] = (c < p.K && d < p.D) ? candidates[c * p.D + d] : zero;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, &sm.Ah[fi * 16][kk], BK + 8);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        // candidates^T as a K x N operand: element (k, n) sits at Ch[n][k], i.e. column-major.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, &sm.Ch[(fj0 + j) * 16][kk], BK + 8);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 2; ++j)
    wmma::store_matrix_sync(&sm.S[fi * 16][(fj0 + j) * 16], acc[j], BN + 4, wmma::mem_row_major);
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Gradient GEMM of one tile: out[o0 + o, :] += sum_n op[o, n] X[x0 + n, :] where op = dL_dS
// (anchor side: o is an anchor row, X = candidates, out = d_anchors) or dL_dS^T (candidate side:
// o is a candidate, X = anchors, out = d_candidates). dL_dS is in sm.S (fp32). Each output
// element is owned by one thread: deterministic.
// ---------------------------------------------------------------------------------------------
template <bool CAND>
__device__ void accumulate_tile(SmemF32& sm, float /*row_dL_dS_max*/, const float* __restrict__ X,
                                int64_t x0, int64_t x_rows, float* __restrict__ out, int64_t o0,
                                int64_t out_rows, int64_t D) {
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  __syncthreads();  // dL_dS complete
  for (int64_t d0 = 0; d0 < D; d0 += DN) {
#pragma unroll
    for (int i = 0; i < BN * DN / THREADS; ++i) {
      const int idx = tid + i * THREADS, n = idx / DN, d = idx % DN;
      const int64_t xr = x0 + n, dd = d0 + d;
      sm.X[n][d] = (xr < x_rows && dd < D) ? X[xr * D + dd] : 0.0f;
    }
    __syncthreads();
    float acc[4][2] = {};
#pragma unroll 8
    for (int n = 0; n < BN; ++n) {
      float h[4], x[2];  // h: dL_dS (or its transpose) entries
#pragma unroll
      for (int i = 0; i < 4; ++i) h[i] = CAND ? sm.S[n][ty + 16 * i] : sm.S[ty + 16 * i][n];
#pragma unroll
      for (int j = 0; j < 2; ++j) x[j] = sm.X[n][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) acc[i][j] = fmaf(h[i], x[j], acc[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t orow = o0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t dd = d0 + tx + 16 * j;
        if (orow < out_rows && dd < D) out[orow * D + dd] += acc[i][j];
      }
    }
    __syncthreads();  // X and S are reused by the next chunk / tile
  }
}

// dL_dS is rounded to T for the tensor cores. Its entries span many decades (g_a can be 1/M,
// Q_ak 1/K, the artanh slope dl_dS up to artanh_scale / artanh_eps), which in fp16 would land in
// subnormals or overflow (docs/math.md, "Numerical hazards"). So each output row's dL_dS values
// (a row of dL_dS, or a column for dL_dS^T) are scaled by a power of two that brings the largest
// into [2^14, 2^15), and the result is scaled back in fp32: exact, and harmless for bf16.
__device__ __forceinline__ void set_scale(float dL_dS_max, float* scale, float* inv_scale) {
  if (dL_dS_max > 0.0f && dL_dS_max <= 3.0e38f) {
    int e = 14 - ilogbf(dL_dS_max);
    e = e < -100 ? -100 : (e > 100 ? 100 : e);
    *scale = ldexpf(1.0f, e);
    *inv_scale = ldexpf(1.0f, -e);
  } else {
    *scale = 1.0f;
    *inv_scale = 1.0f;
  }
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

template <bool CAND, typename T>
__device__ void accumulate_tile(SmemHalf<T>& sm, float row_dL_dS_max, const T* __restrict__ X,
                                int64_t x0, int64_t x_rows, float* __restrict__ out, int64_t o0,
                                int64_t out_rows, int64_t D) {
  const int tid = threadIdx.x, warp = tid / 32, quad_row = tid / 4, part = tid % 4;
  if (!CAND) {
    // Rows of dL_dS: this thread's 16 entries are a quarter of row quad_row.
    const float m = quad_max(row_dL_dS_max);
    if (part == 0) set_scale(m, &sm.scale[quad_row], &sm.inv_scale[quad_row]);
  }
  __syncthreads();  // dL_dS complete (and anchor-side scales)
  if (CAND) {
    // Columns of dL_dS, with the same 64 x 4 thread mapping turned sideways.
    float m = 0.0f;
#pragma unroll
    for (int j = 0; j < 16; ++j) m = fmaxf(m, fabsf(sm.S[part + 4 * j][quad_row]));
    m = quad_max(m);
    if (part == 0) set_scale(m, &sm.scale[quad_row], &sm.inv_scale[quad_row]);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < BM * BN / THREADS; ++i) {
    const int idx = tid + i * THREADS, r = idx / BN, k = idx % BN;
    sm.dL_dSh[r][k] = from_float<T>(sm.S[r][k] * sm.scale[CAND ? k : r]);
  }
  __syncthreads();
  float* R = &sm.S[0][0];  // S is dead now: reuse it for the 64 x DN fp32 result
  constexpr int LDR = DN + 4;
  const int fi = warp / 2, fj = warp % 2;  // 8 warps over 4 x 2 fragments of 16 x 16
  const T zero = from_float<T>(0.0f);
  for (int64_t d0 = 0; d0 < D; d0 += DN) {
#pragma unroll
    for (int i = 0; i < BN * DN / THREADS; ++i) {
      const int idx = tid + i * THREADS, n = idx / DN, d = idx % DN;
      const int64_t xr = x0 + n, dd = d0 + d;
      sm.Xh[n][d] = (xr < x_rows && dd < D) ? X[xr * D + dd] : zero;
    }
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kk = 0; kk < BN; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, &sm.Xh[kk][fj * 16], DN + 8);
      if (CAND) {
        // dL_dS^T: element (o, n) of the operand sits at dL_dSh[n][o], i.e. column-major.
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
        wmma::load_matrix_sync(fa, &sm.dL_dSh[kk][fi * 16], BN + 8);
        wmma::mma_sync(acc, fa, fb, acc);
      } else {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, &sm.dL_dSh[fi * 16][kk], BN + 8);
        wmma::mma_sync(acc, fa, fb, acc);
      }
    }
    wmma::store_matrix_sync(R + fi * 16 * LDR + fj * 16, acc, LDR, wmma::mem_row_major);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < BN * DN / THREADS; ++i) {
      const int idx = tid + i * THREADS, o = idx / DN, d = idx % DN;
      const int64_t orow = o0 + o, dd = d0 + d;
      if (orow < out_rows && dd < D) out[orow * D + dd] += R[o * LDR + d] * sm.inv_scale[o];
    }
    __syncthreads();  // Xh and R are reused by the next chunk / tile
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: block (x, y) = anchor rows [64 x, 64 x + 64) against candidate tiles of split y.
// Thread t serves row t / 4 and its columns t % 4 + 4 j (interleaved: conflict-free banks).
// ---------------------------------------------------------------------------------------------
template <typename T, MaclLogitMap LOGIT_MAP>
__global__ void __launch_bounds__(THREADS)
forward_kernel(Args p, const T* __restrict__ anchors, const T* __restrict__ candidates,
               float* __restrict__ part_max, float* __restrict__ part_sum, int64_t tiles_per_split) {
  __shared__ Smem<T> sm;
  const int tid = threadIdx.x, row = tid / 4, part = tid % 4;
  const int64_t a0 = int64_t(blockIdx.x) * BM, a = a0 + row;
  const Row r = load_row(p, a);
  float m_run = -INFINITY, s_run = 0.0f;  // s_run: this lane's share, all relative to m_run
  const int64_t tiles = cdiv(p.K, BN);
  const int64_t t0 = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t t1 = t0 + tiles_per_split < tiles ? t0 + tiles_per_split : tiles;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = t * BN;
    tile_S(sm, anchors, candidates, a0, c0, p);
    float l[16], mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int k = part + 4 * j;
      // Excluded pairs are dropped by index before the map: artanh never sees the self's S = 1.
      l[j] = in_neg(p, r, c0 + k)
                 ? logit<LOGIT_MAP>(sm.S[row][k], r.inv_temp, p.artanh_scale, p.artanh_eps)
                 : -INFINITY;
      mx = fmaxf(mx, l[j]);
    }
    const float m_new = fmaxf(m_run, quad_max(mx));
    if (m_new != -INFINITY) {  // else nothing seen yet: keep s_run = 0, never exp(-inf + inf)
      s_run *= __expf(m_run - m_new);
#pragma unroll
      for (int j = 0; j < 16; ++j) s_run += __expf(l[j] - m_new);
      m_run = m_new;
    }
    __syncthreads();  // S is overwritten by the next tile
  }
  s_run = quad_sum(s_run);
  if (part == 0 && r.ok) {
    part_max[int64_t(blockIdx.y) * p.M + a] = m_run;
    part_sum[int64_t(blockIdx.y) * p.M + a] = s_run;
  }
}

__global__ void combine_kernel(int64_t M, int64_t splits, const float* __restrict__ part_max,
                               const float* __restrict__ part_sum, float* __restrict__ lse_neg) {
  const int64_t a = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (a >= M) return;
  float m = -INFINITY;
  for (int64_t y = 0; y < splits; ++y) m = fmaxf(m, part_max[y * M + a]);
  float s = 0.0f;
  if (m != -INFINITY)
    for (int64_t y = 0; y < splits; ++y) {
      const float my = part_max[y * M + a];
      if (my != -INFINITY) s += part_sum[y * M + a] * __expf(my - m);
    }
  lse_neg[a] = m + logf(s);  // -inf for an anchor without negatives (Python forbids it)
}

// ---------------------------------------------------------------------------------------------
// Backward. Blocks [0, anchor_blocks) are anchor blocks, the rest candidate blocks (see top).
// ---------------------------------------------------------------------------------------------
// out: d_anchors (anchor side, !CAND) or d_candidates (candidate side, CAND), or nullptr.
template <bool CAND, typename T, MaclLogitMap LOGIT_MAP>
__device__ void backward_side(Smem<T>& sm, const Args& p, const T* __restrict__ anchors,
                              const T* __restrict__ candidates, const float* __restrict__ lse_neg,
                              const float* __restrict__ g, float* __restrict__ out,
                              float* __restrict__ d_inv_temp, int64_t block) {
  const int tid = threadIdx.x, row = tid / 4, part = tid % 4;
  const int64_t o0 = block * 64;
  const int64_t tiles = CAND ? cdiv(p.M, BM) : cdiv(p.K, BN);
  float d_inv_temp_a = 0.0f;  // this lane's share of d_inv_temp[a] (anchor side)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t a0 = CAND ? t * BM : o0, c0 = CAND ? o0 : t * BN;
    tile_S(sm, anchors, candidates, a0, c0, p);
    const int64_t a = a0 + row;
    const Row r = load_row(p, a);
    const float lse_neg_a = r.ok ? lse_neg[a] : 0.0f, g_a = r.ok ? g[a] : 0.0f;
    float dL_dS_max = 0.0f;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int k = part + 4 * j;
      const float S_ak = sm.S[row][k];
      float dL_dS = 0.0f;
      if (in_neg(p, r, c0 + k)) {
        const float dL_dl =
            g_a * __expf(logit<LOGIT_MAP>(S_ak, r.inv_temp, p.artanh_scale, p.artanh_eps) -
                         lse_neg_a);
        d_inv_temp_a = fmaf(dL_dl, S_ak, d_inv_temp_a);
        dL_dS = dL_dl * dl_dS<LOGIT_MAP>(S_ak, r.inv_temp, p.artanh_scale, p.artanh_eps);
      }
      sm.S[row][k] = dL_dS;
      dL_dS_max = fmaxf(dL_dS_max, fabsf(dL_dS));
    }
    if (out != nullptr) {  // uniform over the block
      accumulate_tile<CAND>(sm, dL_dS_max, CAND ? anchors : candidates, CAND ? a0 : c0,
                            CAND ? p.M : p.K, out, o0, CAND ? p.K : p.M, p.D);
    } else {
      __syncthreads();
    }
  }
  if (!CAND && d_inv_temp != nullptr) {
    d_inv_temp_a = quad_sum(d_inv_temp_a);
    if (part == 0 && o0 + row < p.M) d_inv_temp[o0 + row] = d_inv_temp_a;
  }
}

template <typename T, MaclLogitMap LOGIT_MAP>
__global__ void __launch_bounds__(THREADS)
backward_kernel(Args p, const T* __restrict__ anchors, const T* __restrict__ candidates,
                const float* __restrict__ lse_neg, const float* __restrict__ g,
                float* __restrict__ d_anchors, float* __restrict__ d_candidates,
                float* __restrict__ d_inv_temp, int64_t anchor_blocks) {
  __shared__ Smem<T> sm;
  const int64_t b = blockIdx.x;
  if (b < anchor_blocks)
    backward_side<false, T, LOGIT_MAP>(sm, p, anchors, candidates, lse_neg, g, d_anchors,
                                       d_inv_temp, b);
  else
    backward_side<true, T, LOGIT_MAP>(sm, p, anchors, candidates, lse_neg, g, d_candidates,
                                      nullptr, b - anchor_blocks);
}


// ---------------------------------------------------------------------------------------------
// The softplus row reduction (SigLIP): sibling kernels of the ones above.
// ---------------------------------------------------------------------------------------------
// softplus(x) = max(x, 0) + log1p(e^-|x|): 0 at x = -inf (never reached: excluded pairs are
// skipped), NaN stays NaN (x < 0 is false for NaN).
__device__ __forceinline__ float softplus_stable(float x) {
  return (x < 0.0f ? 0.0f : x) + log1pf(__expf(-fabsf(x)));
}

__device__ __forceinline__ float sigmoid_stable(float x) {
  const float e = __expf(-fabsf(x)), r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}

template <typename T>
__global__ void __launch_bounds__(THREADS)
softplus_forward_kernel(Args p, const T* __restrict__ anchors, const T* __restrict__ candidates,
                        const float* __restrict__ row_bias, float* __restrict__ part_sum,
                        int64_t tiles_per_split) {
  __shared__ Smem<T> sm;
  const int tid = threadIdx.x, row = tid / 4, part = tid % 4;
  const int64_t a0 = int64_t(blockIdx.x) * BM, a = a0 + row;
  const Row r = load_row(p, a);
  const float bias = (r.ok && row_bias != nullptr) ? row_bias[a] : 0.0f;
  float s_run = 0.0f;  // this lane's share of the row's sum
  const int64_t tiles = cdiv(p.K, BN);
  const int64_t t0 = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t t1 = t0 + tiles_per_split < tiles ? t0 + tiles_per_split : tiles;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = t * BN;
    tile_S(sm, anchors, candidates, a0, c0, p);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int k = part + 4 * j;
      if (in_neg(r, c0 + k, p.K)) s_run += softplus_stable(r.inv_temp * sm.S[row][k] + bias);
    }
    __syncthreads();  // S is overwritten by the next tile
  }
  s_run = quad_sum(s_run);
  if (part == 0 && r.ok) part_sum[int64_t(blockIdx.y) * p.M + a] = s_run;
}

__global__ void softplus_combine_kernel(int64_t M, int64_t splits,
                                        const float* __restrict__ part_sum,
                                        float* __restrict__ sp_neg) {
  const int64_t a = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (a >= M) return;
  float s = 0.0f;
  for (int64_t y = 0; y < splits; ++y) s += part_sum[y * M + a];  // fixed order
  sp_neg[a] = s;
}

// out: d_anchors (anchor side, !CAND) or d_candidates (candidate side, CAND), or nullptr. The
// anchor side also writes d_inv_temp and d_row_bias (each may be nullptr).
template <bool CAND, typename T>
__device__ void softplus_backward_side(Smem<T>& sm, const Args& p, const T* __restrict__ anchors,
                                       const T* __restrict__ candidates,
                                       const float* __restrict__ row_bias,
                                       const float* __restrict__ g, float* __restrict__ out,
                                       float* __restrict__ d_inv_temp,
                                       float* __restrict__ d_row_bias, int64_t block) {
  const int tid = threadIdx.x, row = tid / 4, part = tid % 4;
  const int64_t o0 = block * 64;
  const int64_t tiles = CAND ? cdiv(p.M, BM) : cdiv(p.K, BN);
  float d_inv_temp_a = 0.0f, d_row_bias_a = 0.0f;  // this lane's shares (anchor side)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t a0 = CAND ? t * BM : o0, c0 = CAND ? o0 : t * BN;
    tile_S(sm, anchors, candidates, a0, c0, p);
    const int64_t a = a0 + row;
    const Row r = load_row(p, a);
    const float g_a = r.ok ? g[a] : 0.0f;
    const float bias = (r.ok && row_bias != nullptr) ? row_bias[a] : 0.0f;
    float dL_dS_max = 0.0f;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int k = part + 4 * j;
      const float S_ak = sm.S[row][k];
      float dL_dS = 0.0f;
      if (in_neg(r, c0 + k, p.K)) {
        const float dL_dl = g_a * sigmoid_stable(r.inv_temp * S_ak + bias);
        d_inv_temp_a = fmaf(dL_dl, S_ak, d_inv_temp_a);
        d_row_bias_a += dL_dl;
        dL_dS = dL_dl * r.inv_temp;
      }
      sm.S[row][k] = dL_dS;
      dL_dS_max = fmaxf(dL_dS_max, fabsf(dL_dS));
    }
    if (out != nullptr) {  // uniform over the block
      accumulate_tile<CAND>(sm, dL_dS_max, CAND ? anchors : candidates, CAND ? a0 : c0,
                            CAND ? p.M : p.K, out, o0, CAND ? p.K : p.M, p.D);
    } else {
      __syncthreads();
    }
  }
  if (!CAND) {
    d_inv_temp_a = quad_sum(d_inv_temp_a);
    d_row_bias_a = quad_sum(d_row_bias_a);
    if (part == 0 && o0 + row < p.M) {
      if (d_inv_temp != nullptr) d_inv_temp[o0 + row] = d_inv_temp_a;
      if (d_row_bias != nullptr) d_row_bias[o0 + row] = d_row_bias_a;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS)
softplus_backward_kernel(Args p, const T* __restrict__ anchors,
                         const T* __restrict__ candidates, const float* __restrict__ row_bias,
                         const float* __restrict__ g, float* __restrict__ d_anchors,
                         float* __restrict__ d_candidates, float* __restrict__ d_inv_temp,
                         float* __restrict__ d_row_bias, int64_t anchor_blocks) {
  __shared__ Smem<T> sm;
  const int64_t b = blockIdx.x;
  if (b < anchor_blocks)
    softplus_backward_side<false, T>(sm, p, anchors, candidates, row_bias, g, d_anchors,
                                     d_inv_temp, d_row_bias, b);
  else
    softplus_backward_side<true, T>(sm, p, anchors, candidates, row_bias, g, d_candidates,
                                    nullptr, nullptr, b - anchor_blocks);
}

// ---------------------------------------------------------------------------------------------
// Both directions of one S (layout cross_sym on one process, MaclProblem.both_directions): the
// rows of S are the anchors against the candidates (Args rows) and, mirrored, its columns the
// candidates against the anchors (Args mirrored: M and K swapped, the per-anchor arrays from
// entry M on). Each tile of S is computed once per pass and serves both directions
// (docs/math.md, "Both directions of one S"): every tile is mirrored (docs/design.md, glossary).
// ---------------------------------------------------------------------------------------------

// Forward: forward_kernel's row statistics, plus per column of the tile this anchor block's
// partial (max, sum of exp(l - max)) of the column's logits over the block's 64 rows, stored at
// [blockIdx.x * K + k] of col_max / col_sum. Every (anchor block, column) pair is written by
// exactly one block (each candidate tile belongs to one split); combine_kernel merges the
// partials over the anchor blocks in block order: no atomics, deterministic.
template <typename T, MaclLogitMap LOGIT_MAP>
__global__ void __launch_bounds__(THREADS)
both_forward_kernel(Args p, Args mirrored, const T* __restrict__ anchors,
                    const T* __restrict__ candidates, float* __restrict__ part_max,
                    float* __restrict__ part_sum, float* __restrict__ col_max,
                    float* __restrict__ col_sum, int64_t tiles_per_split) {
  __shared__ Smem<T> sm;
  const int tid = threadIdx.x, row = tid / 4, part = tid % 4;
  const int64_t a0 = int64_t(blockIdx.x) * BM, a = a0 + row;
  const Row r = load_row(p, a);
  float m_run = -INFINITY, s_run = 0.0f;  // s_run: this lane's share, all relative to m_run
  const int64_t tiles = cdiv(p.K, BN);
  const int64_t t0 = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t t1 = t0 + tiles_per_split < tiles ? t0 + tiles_per_split : tiles;
  const int64_t col_part = int64_t(blockIdx.x) * p.K;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = t * BN;
    tile_S(sm, anchors, candidates, a0, c0, p);
    {  // Rows: thread t serves row t / 4, columns t % 4 + 4 j (as forward_kernel).
      float l[16], mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const int k = part + 4 * j;
        l[j] = in_neg(r, c0 + k, p.K)
                   ? logit<LOGIT_MAP>(sm.S[row][k], r.inv_temp, p.artanh_scale, p.artanh_eps)
                   : -INFINITY;
        mx = fmaxf(mx, l[j]);
      }
      const float m_new = fmaxf(m_run, quad_max(mx));
      if (m_new != -INFINITY) {
        s_run *= __expf(m_run - m_new);
#pragma unroll
        for (int j = 0; j < 16; ++j) s_run += __expf(l[j] - m_new);
        m_run = m_new;
      }
    }
    {  // Columns: the same mapping turned sideways, thread t serves column t / 4 of the tile
       // (candidate k as an anchor) and rows t % 4 + 4 j (its candidates among the anchors).
      const int64_t k = c0 + row;
      const Row c = load_row(mirrored, k);  // c.ok: k < K
      float l[16], mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const int i = part + 4 * j;
        l[j] = in_neg(c, a0 + i, mirrored.K)
                   ? logit<LOGIT_MAP>(sm.S[i][row], c.inv_temp, p.artanh_scale, p.artanh_eps)
                   : -INFINITY;
        mx = fmaxf(mx, l[j]);
      }
      mx = quad_max(mx);
      float sum = 0.0f;
      if (mx != -INFINITY) {  // else no negative of column k in this block: (-inf, 0)
#pragma unroll
        for (int j = 0; j < 16; ++j) sum += __expf(l[j] - mx);
      }
      sum = quad_sum(sum);
      if (part == 0 && c.ok) {
        col_max[col_part + k] = mx;
        col_sum[col_part + k] = sum;
      }
    }
    __syncthreads();  // S is overwritten by the next tile
  }
  s_run = quad_sum(s_run);
  if (part == 0 && r.ok) {
    part_max[int64_t(blockIdx.y) * p.M + a] = m_run;
    part_sum[int64_t(blockIdx.y) * p.M + a] = s_run;
  }
}

// The other side's per-entry data of one tile (64 entries, each an anchor of the mirror of the
// block's own direction), staged once per tile.
struct OtherRows {
  float inv_temp[64];
  float lse_neg[64];
  float g[64];
  int64_t pos_index[64];
  int64_t self_index[64];
};

template <typename T>
struct SmemBoth {
  Smem<T> tile;
  OtherRows other;
};

static_assert(sizeof(SmemBoth<float>) <= 48 * 1024, "static shared memory limit");
static_assert(sizeof(SmemBoth<__half>) <= 48 * 1024, "static shared memory limit");

// Backward, one side in both directions: a block owns 64 rows of one side (anchor blocks, !CAND:
// anchors; candidate blocks, CAND: candidates) and loops over the other side's tiles. From each
// recomputed tile it forms dL_dS_ak = (the row direction's term) + (the mirrored direction's
// term) and accumulates its own rows' gradient, as backward_side does for one direction, and its
// own rows' d_inv_temp entries. In the block's frame, `own` is the direction in which its rows
// are the anchors (rows for anchor blocks, mirrored for candidate blocks) and `other` its mirror
// (the other side's entries as anchors, the block's rows their candidates). Thread t serves own
// row t / 4 and other entries t % 4 + 4 j, so the own statistics sit in registers for the whole
// block and the d_inv_temp sum stays in a quad; the other entries' statistics are staged in
// shared memory per tile.
// lse_neg, g, d_inv_temp: [M + K] (rows, then columns); out: d_anchors (!CAND) or d_candidates
// (CAND), or nullptr.
template <bool CAND, typename T, MaclLogitMap LOGIT_MAP>
__device__ void both_backward_side(SmemBoth<T>& sm, const Args& rows, const Args& mirrored,
                                   const T* __restrict__ anchors, const T* __restrict__ candidates,
                                   const float* __restrict__ lse_neg, const float* __restrict__ g,
                                   float* __restrict__ out, float* __restrict__ d_inv_temp,
                                   int64_t block) {
  const Args& own = CAND ? mirrored : rows;    // own rows as anchors, the other side candidates
  const Args& other = CAND ? rows : mirrored;  // other entries as anchors, own rows candidates
  const int64_t own_offset = CAND ? rows.M : 0, other_offset = CAND ? 0 : rows.M;
  const int tid = threadIdx.x, own_row = tid / 4, part = tid % 4;
  const int64_t o0 = block * 64, o = o0 + own_row;
  const Row r = load_row(own, o);
  const float lse_neg_o = r.ok ? lse_neg[own_offset + o] : 0.0f;
  const float g_o = r.ok ? g[own_offset + o] : 0.0f;
  float d_inv_temp_o = 0.0f;  // this lane's share of d_inv_temp of own row o
  const int64_t tiles = cdiv(own.K, 64);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t s0 = t * 64;
    const int64_t a0 = CAND ? s0 : o0, c0 = CAND ? o0 : s0;
    if (tid < 64) {  // visible after tile_S's barriers; the previous tile's readers are done
      const Row e = load_row(other, s0 + tid);
      sm.other.inv_temp[tid] = e.inv_temp;
      sm.other.lse_neg[tid] = e.ok ? lse_neg[other_offset + s0 + tid] : 0.0f;
      sm.other.g[tid] = e.ok ? g[other_offset + s0 + tid] : 0.0f;
      sm.other.pos_index[tid] = e.pos_index;
      sm.other.self_index[tid] = e.self_index;
    }
    tile_S(sm.tile, anchors, candidates, a0, c0, rows);
    float dL_dS_max = 0.0f;
#pragma unroll 4
    for (int j = 0; j < 16; ++j) {
      const int s = part + 4 * j;
      const int64_t e = s0 + s;
      float& S_ref = CAND ? sm.tile.S[s][own_row] : sm.tile.S[own_row][s];
      const float S_ak = S_ref;
      float dL_dS = 0.0f;
      if (in_neg(r, e, own.K)) {  // own row o as the anchor, other entry e its candidate
        const float dL_dl =
            g_o * __expf(logit<LOGIT_MAP>(S_ak, r.inv_temp, rows.artanh_scale,
                                          rows.artanh_eps) - lse_neg_o);
        d_inv_temp_o = fmaf(dL_dl, S_ak, d_inv_temp_o);
        dL_dS = dL_dl * dl_dS<LOGIT_MAP>(S_ak, r.inv_temp, rows.artanh_scale, rows.artanh_eps);
      }
      // Other entry e as the anchor, own row o its candidate.
      if (e < other.M && o < own.M && o != sm.other.pos_index[s] &&
          o != sm.other.self_index[s]) {
        const float inv_temp_e = sm.other.inv_temp[s];
        dL_dS = fmaf(sm.other.g[s] *
                         __expf(logit<LOGIT_MAP>(S_ak, inv_temp_e, rows.artanh_scale,
                                                 rows.artanh_eps) - sm.other.lse_neg[s]),
                     dl_dS<LOGIT_MAP>(S_ak, inv_temp_e, rows.artanh_scale, rows.artanh_eps),
                     dL_dS);
      }
      S_ref = dL_dS;  // each entry is read and written by this thread only
      dL_dS_max = fmaxf(dL_dS_max, fabsf(dL_dS));
    }
    if (out != nullptr) {  // uniform over the block
      accumulate_tile<CAND>(sm.tile, dL_dS_max, CAND ? anchors : candidates, CAND ? a0 : c0,
                            CAND ? rows.M : rows.K, out, o0, own.M, rows.D);
    } else {
      __syncthreads();
    }
  }
  if (d_inv_temp != nullptr) {
    d_inv_temp_o = quad_sum(d_inv_temp_o);
    if (part == 0 && r.ok) d_inv_temp[own_offset + o] = d_inv_temp_o;
  }
}

// At least one block per SM: lets ptxas keep both directions' statistics in registers rather
// than spill them at its default register cap (the block is register-bound either way).
template <typename T, MaclLogitMap LOGIT_MAP>
__global__ void __launch_bounds__(THREADS, 1)
both_backward_kernel(Args rows, Args mirrored, const T* __restrict__ anchors,
                     const T* __restrict__ candidates, const float* __restrict__ lse_neg,
                     const float* __restrict__ g, float* __restrict__ d_anchors,
                     float* __restrict__ d_candidates, float* __restrict__ d_inv_temp,
                     int64_t anchor_blocks) {
  __shared__ SmemBoth<T> sm;
  const int64_t b = blockIdx.x;
  if (b < anchor_blocks)
    both_backward_side<false, T, LOGIT_MAP>(sm, rows, mirrored, anchors, candidates, lse_neg, g,
                                            d_anchors, d_inv_temp, b);
  else
    both_backward_side<true, T, LOGIT_MAP>(sm, rows, mirrored, anchors, candidates, lse_neg, g,
                                           d_candidates, d_inv_temp, b - anchor_blocks);
}

// ---------------------------------------------------------------------------------------------
// float64: one thread per anchor row (forward, d_anchors, d_inv_temp) or candidate row
// (d_candidates), no shared memory. The logit map is a runtime field here.
// ---------------------------------------------------------------------------------------------
struct ArgsF64 {
  int64_t M, K, D;
  int logit_map;  // MaclLogitMap
  double artanh_scale, artanh_eps;
  const double* inv_temp;
  const int64_t* pos_index;
  const int64_t* self_index;
  const int64_t* anchor_labels;  // nullptr: no label mask
  const int64_t* candidate_labels;
};

__device__ __forceinline__ double dot64(const double* x, const double* y, int64_t D) {
  double s = 0.0;
  for (int64_t d = 0; d < D; ++d) s = fma(x[d], y[d], s);
  return s;
}

__device__ __forceinline__ bool excluded64(const ArgsF64& p, int64_t a, int64_t k) {
  return k == p.pos_index[a] || (p.self_index != nullptr && k == p.self_index[a]) ||
         (p.anchor_labels != nullptr && p.candidate_labels[k] == p.anchor_labels[a]);
}

__device__ __forceinline__ double logit64(const ArgsF64& p, int64_t a, double S_ak) {
  if (p.logit_map == MACL_LOGIT_MAP_ARTANH)
    return p.artanh_scale * atanh(fmin(fmax(S_ak, -1.0 + p.artanh_eps), 1.0 - p.artanh_eps));
  return p.inv_temp[a] * S_ak;
}

__device__ __forceinline__ double dl_dS64(const ArgsF64& p, int64_t a, double S_ak) {
  if (p.logit_map == MACL_LOGIT_MAP_ARTANH)
    return fabs(S_ak) < 1.0 - p.artanh_eps
               ? p.artanh_scale / fmax(1.0 - S_ak * S_ak, p.artanh_eps)
               : 0.0;
  return p.inv_temp[a];
}

__global__ void forward_f64(ArgsF64 p, const double* __restrict__ anchors,
                            const double* __restrict__ candidates,
                            double* __restrict__ lse_neg) {
  const int64_t a = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (a >= p.M) return;
  double m = -INFINITY, s = 0.0;
  for (int64_t k = 0; k < p.K; ++k) {
    if (excluded64(p, a, k)) continue;
    const double l = logit64(p, a, dot64(anchors + a * p.D, candidates + k * p.D, p.D));
    if (l > m) {
      s = s * exp(m - l) + 1.0;
      m = l;
    } else {
      s += exp(l - m);
    }
  }
  lse_neg[a] = m + log(s);
}

__global__ void backward_f64(ArgsF64 p, const double* __restrict__ anchors,
                             const double* __restrict__ candidates,
                             const double* __restrict__ lse_neg, const double* __restrict__ g,
                             double* __restrict__ d_anchors, double* __restrict__ d_candidates,
                             double* __restrict__ d_inv_temp, int64_t anchor_threads) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < anchor_threads) {
    const int64_t a = t;
    if (a >= p.M) return;
    double d_inv_temp_a = 0.0;
    for (int64_t k = 0; k < p.K; ++k) {
      if (excluded64(p, a, k)) continue;
      const double S_ak = dot64(anchors + a * p.D, candidates + k * p.D, p.D);
      const double dL_dl = g[a] * exp(logit64(p, a, S_ak) - lse_neg[a]);
      d_inv_temp_a += dL_dl * S_ak;
      if (d_anchors != nullptr) {
        const double dL_dS = dL_dl * dl_dS64(p, a, S_ak);
        for (int64_t d = 0; d < p.D; ++d)
          d_anchors[a * p.D + d] += dL_dS * candidates[k * p.D + d];
      }
    }
    if (d_inv_temp != nullptr) d_inv_temp[a] = d_inv_temp_a;
  } else {
    const int64_t k = t - anchor_threads;
    if (k >= p.K || d_candidates == nullptr) return;
    for (int64_t a = 0; a < p.M; ++a) {
      if (excluded64(p, a, k)) continue;
      const double S_ak = dot64(anchors + a * p.D, candidates + k * p.D, p.D);
      const double dL_dS =
          g[a] * exp(logit64(p, a, S_ak) - lse_neg[a]) * dl_dS64(p, a, S_ak);
      for (int64_t d = 0; d < p.D; ++d) d_candidates[k * p.D + d] += dL_dS * anchors[a * p.D + d];
    }
  }
}


// The softplus reduction in float64 (scaled map): one thread per row, as above.
__device__ __forceinline__ double softplus64(double x) {
  return (x < 0.0 ? 0.0 : x) + log1p(exp(-fabs(x)));
}

__device__ __forceinline__ double sigmoid64(double x) {
  const double e = exp(-fabs(x)), r = 1.0 / (1.0 + e);
  return x >= 0.0 ? r : e * r;
}

__global__ void softplus_forward_f64(ArgsF64 p, const double* __restrict__ anchors,
                                     const double* __restrict__ candidates,
                                     const double* __restrict__ row_bias,
                                     double* __restrict__ sp_neg) {
  const int64_t a = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (a >= p.M) return;
  const double bias = row_bias != nullptr ? row_bias[a] : 0.0;
  double s = 0.0;
  for (int64_t k = 0; k < p.K; ++k) {
    if (excluded64(p, a, k)) continue;
    s += softplus64(p.inv_temp[a] * dot64(anchors + a * p.D, candidates + k * p.D, p.D) + bias);
  }
  sp_neg[a] = s;
}

__global__ void softplus_backward_f64(ArgsF64 p, const double* __restrict__ anchors,
                                      const double* __restrict__ candidates,
                                      const double* __restrict__ row_bias,
                                      const double* __restrict__ g,
                                      double* __restrict__ d_anchors,
                                      double* __restrict__ d_candidates,
                                      double* __restrict__ d_inv_temp,
                                      double* __restrict__ d_row_bias, int64_t anchor_threads) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < anchor_threads) {
    const int64_t a = t;
    if (a >= p.M) return;
    const double bias = row_bias != nullptr ? row_bias[a] : 0.0;
    double d_inv_temp_a = 0.0, d_row_bias_a = 0.0;
    for (int64_t k = 0; k < p.K; ++k) {
      if (excluded64(p, a, k)) continue;
      const double S_ak = dot64(anchors + a * p.D, candidates + k * p.D, p.D);
      const double dL_dl = g[a] * sigmoid64(p.inv_temp[a] * S_ak + bias);
      d_inv_temp_a += dL_dl * S_ak;
      d_row_bias_a += dL_dl;
      if (d_anchors != nullptr) {
        const double dL_dS = dL_dl * p.inv_temp[a];
        for (int64_t d = 0; d < p.D; ++d)
          d_anchors[a * p.D + d] += dL_dS * candidates[k * p.D + d];
      }
    }
    if (d_inv_temp != nullptr) d_inv_temp[a] = d_inv_temp_a;
    if (d_row_bias != nullptr) d_row_bias[a] = d_row_bias_a;
  } else {
    const int64_t k = t - anchor_threads;
    if (k >= p.K || d_candidates == nullptr) return;
    for (int64_t a = 0; a < p.M; ++a) {
      if (excluded64(p, a, k)) continue;
      const double S_ak = dot64(anchors + a * p.D, candidates + k * p.D, p.D);
      const double bias = row_bias != nullptr ? row_bias[a] : 0.0;
      const double dL_dS = g[a] * sigmoid64(p.inv_temp[a] * S_ak + bias) * p.inv_temp[a];
      for (int64_t d = 0; d < p.D; ++d) d_candidates[k * p.D + d] += dL_dS * anchors[a * p.D + d];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------------------------
bool is_artanh(const MaclProblem* p) { return p->logit_map == MACL_LOGIT_MAP_ARTANH; }

// The plain float64 backward of one direction (args: its M, K and per-anchor arrays).
void launch_backward_f64(const ArgsF64& args, const double* anchors, const double* candidates,
                         const double* lse_neg, const double* g, double* d_anchors,
                         double* d_candidates, double* d_inv_temp, cudaStream_t stream) {
  const int64_t anchor_threads =
      (d_anchors != nullptr || d_inv_temp != nullptr) ? cdiv(args.M, 128) * 128 : 0;
  const int64_t threads = anchor_threads + (d_candidates != nullptr ? args.K : 0);
  if (threads == 0) return;
  backward_f64<<<static_cast<unsigned>(cdiv(threads, 128)), 128, 0, stream>>>(
      args, anchors, candidates, lse_neg, g, d_anchors, d_candidates, d_inv_temp,
      anchor_threads);
}

Args make_args(const MaclProblem* p) {
  return Args{p->M, p->K, p->D, static_cast<float>(p->artanh_scale),
              static_cast<float>(p->artanh_eps),
              is_artanh(p) ? nullptr : static_cast<const float*>(p->inv_temp), p->pos_index,
              p->self_index, p->anchor_labels, p->candidate_labels};
}

ArgsF64 make_args64(const MaclProblem* p) {
  return ArgsF64{p->M, p->K, p->D, p->logit_map, p->artanh_scale, p->artanh_eps,
                 is_artanh(p) ? nullptr : static_cast<const double*>(p->inv_temp), p->pos_index,
                 p->self_index, p->anchor_labels, p->candidate_labels};
}

// both_directions: the mirrored direction, the columns of S as anchors (candidates against
// anchors: M and K swapped), read from entry M on of the per-anchor arrays.
Args make_mirrored_args(const MaclProblem* p) {
  Args a = make_args(p);
  a.M = p->K;
  a.K = p->M;
  if (a.inv_temp != nullptr) a.inv_temp += p->M;
  a.pos_index += p->M;
  if (a.self_index != nullptr) a.self_index += p->M;
  return a;
}

ArgsF64 make_mirrored_args64(const MaclProblem* p) {
  ArgsF64 a = make_args64(p);
  a.M = p->K;
  a.K = p->M;
  if (a.inv_temp != nullptr) a.inv_temp += p->M;
  a.pos_index += p->M;
  if (a.self_index != nullptr) a.self_index += p->M;
  return a;
}

int64_t forward_splits(int64_t M, int64_t K) {
  const int64_t anchor_blocks = cdiv(M, BM), tiles = cdiv(K, BN);
  int64_t splits = cdiv(FORWARD_TARGET_BLOCKS, anchor_blocks);
  if (splits > tiles) splits = tiles;
  if (splits > 65535) splits = 65535;
  return splits < 1 ? 1 : splits;
}

template <typename T, MaclLogitMap LOGIT_MAP>
cudaError_t launch_forward(const MaclProblem* p, const void* anchors, const void* candidates,
                           float* lse_neg, float* workspace, cudaStream_t stream) {
  const Args args = make_args(p);
  const int64_t splits = forward_splits(p->M, p->K);
  const int64_t tiles_per_split = cdiv(cdiv(p->K, BN), splits);
  float* part_max = workspace;
  float* part_sum = workspace + splits * p->M;
  const dim3 grid(static_cast<unsigned>(cdiv(p->M, BM)), static_cast<unsigned>(splits));
  forward_kernel<T, LOGIT_MAP><<<grid, THREADS, 0, stream>>>(
      args, static_cast<const T*>(anchors), static_cast<const T*>(candidates), part_max,
      part_sum, tiles_per_split);
  combine_kernel<<<static_cast<unsigned>(cdiv(p->M, 256)), 256, 0, stream>>>(
      p->M, splits, part_max, part_sum, lse_neg);
  return cudaGetLastError();
}

// both_directions: rows' partials [splits, M] as launch_forward, then the columns' partials
// [cdiv(M, BM), K]; lse_neg [M + K].
template <typename T, MaclLogitMap LOGIT_MAP>
cudaError_t launch_both_forward(const MaclProblem* p, const void* anchors, const void* candidates,
                                float* lse_neg, float* workspace, cudaStream_t stream) {
  const Args args = make_args(p), mirrored = make_mirrored_args(p);
  const int64_t splits = forward_splits(p->M, p->K);
  const int64_t tiles_per_split = cdiv(cdiv(p->K, BN), splits);
  const int64_t anchor_blocks = cdiv(p->M, BM);
  float* part_max = workspace;
  float* part_sum = workspace + splits * p->M;
  float* col_max = workspace + 2 * splits * p->M;
  float* col_sum = col_max + anchor_blocks * p->K;
  const dim3 grid(static_cast<unsigned>(anchor_blocks), static_cast<unsigned>(splits));
  both_forward_kernel<T, LOGIT_MAP><<<grid, THREADS, 0, stream>>>(
      args, mirrored, static_cast<const T*>(anchors), static_cast<const T*>(candidates), part_max,
      part_sum, col_max, col_sum, tiles_per_split);
  combine_kernel<<<static_cast<unsigned>(cdiv(p->M, 256)), 256, 0, stream>>>(
      p->M, splits, part_max, part_sum, lse_neg);
  if (p->K > 0)
    combine_kernel<<<static_cast<unsigned>(cdiv(p->K, 256)), 256, 0, stream>>>(
        p->K, anchor_blocks, col_max, col_sum, lse_neg + p->M);
  return cudaGetLastError();
}

// both_directions: anchor blocks write d_anchors and the rows' d_inv_temp, candidate blocks
// d_candidates and the columns' d_inv_temp ([M + K]).
template <typename T, MaclLogitMap LOGIT_MAP>
cudaError_t launch_both_backward(const MaclProblem* p, const void* anchors,
                                 const void* candidates, const float* lse_neg, const float* g,
                                 float* d_anchors, float* d_candidates, float* d_inv_temp,
                                 cudaStream_t stream) {
  const Args args = make_args(p), mirrored = make_mirrored_args(p);
  const int64_t anchor_blocks =
      (d_anchors != nullptr || d_inv_temp != nullptr) ? cdiv(p->M, BM) : 0;
  const int64_t candidate_blocks =
      (d_candidates != nullptr || d_inv_temp != nullptr) ? cdiv(p->K, BN) : 0;
  const int64_t blocks = anchor_blocks + candidate_blocks;
  if (blocks == 0) return cudaSuccess;
  both_backward_kernel<T, LOGIT_MAP><<<static_cast<unsigned>(blocks), THREADS, 0, stream>>>(
      args, mirrored, static_cast<const T*>(anchors), static_cast<const T*>(candidates), lse_neg, g,
      d_anchors, d_candidates, d_inv_temp, anchor_blocks);
  return cudaGetLastError();
}

template <typename T, MaclLogitMap LOGIT_MAP>
cudaError_t launch_backward(const MaclProblem* p, const void* anchors, const void* candidates,
                            const float* lse_neg, const float* g, float* d_anchors,
                            float* d_candidates, float* d_inv_temp, cudaStream_t stream) {
  const Args args = make_args(p);
  // Blocks with nothing to produce are not launched at all.
  const int64_t anchor_blocks =
      (d_anchors != nullptr || d_inv_temp != nullptr) ? cdiv(p->M, BM) : 0;
  const int64_t candidate_blocks = d_candidates != nullptr ? cdiv(p->K, BN) : 0;
  const int64_t blocks = anchor_blocks + candidate_blocks;
  if (blocks == 0) return cudaSuccess;
  backward_kernel<T, LOGIT_MAP><<<static_cast<unsigned>(blocks), THREADS, 0, stream>>>(
      args, static_cast<const T*>(anchors), static_cast<const T*>(candidates), lse_neg, g,
      d_anchors, d_candidates, d_inv_temp, anchor_blocks);
  return cudaGetLastError();
}


template <typename T>
cudaError_t launch_softplus_forward(const MaclProblem* p, const void* anchors,
                                    const void* candidates, const float* row_bias, float* sp_neg,
                                    float* workspace, cudaStream_t stream) {
  const Args args = make_args(p);
  const int64_t splits = forward_splits(p->M, p->K);
  const int64_t tiles_per_split = cdiv(cdiv(p->K, BN), splits);
  const dim3 grid(static_cast<unsigned>(cdiv(p->M, BM)), static_cast<unsigned>(splits));
  softplus_forward_kernel<T><<<grid, THREADS, 0, stream>>>(
      args, static_cast<const T*>(anchors), static_cast<const T*>(candidates), row_bias,
      workspace, tiles_per_split);
  softplus_combine_kernel<<<static_cast<unsigned>(cdiv(p->M, 256)), 256, 0, stream>>>(
      p->M, splits, workspace, sp_neg);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_softplus_backward(const MaclProblem* p, const void* anchors,
                                     const void* candidates, const float* row_bias,
                                     const float* g, float* d_anchors, float* d_candidates,
                                     float* d_inv_temp, float* d_row_bias, cudaStream_t stream) {
  const Args args = make_args(p);
  const int64_t anchor_blocks =
      (d_anchors != nullptr || d_inv_temp != nullptr || d_row_bias != nullptr) ? cdiv(p->M, BM)
                                                                                : 0;
  const int64_t candidate_blocks = d_candidates != nullptr ? cdiv(p->K, BN) : 0;
  const int64_t blocks = anchor_blocks + candidate_blocks;
  if (blocks == 0) return cudaSuccess;
  softplus_backward_kernel<T><<<static_cast<unsigned>(blocks), THREADS, 0, stream>>>(
      args, static_cast<const T*>(anchors), static_cast<const T*>(candidates), row_bias, g,
      d_anchors, d_candidates, d_inv_temp, d_row_bias, anchor_blocks);
  return cudaGetLastError();
}

template <MaclLogitMap LOGIT_MAP>
cudaError_t forward_map(const MaclProblem* p, const void* anchors, const void* candidates,
                        float* lse_neg, float* ws, cudaStream_t s) {
  if (p->both_directions) {
    switch (p->operand) {
      case MACL_OPERAND_F32:
        return launch_both_forward<float, LOGIT_MAP>(p, anchors, candidates, lse_neg, ws, s);
      case MACL_OPERAND_F16:
        return launch_both_forward<__half, LOGIT_MAP>(p, anchors, candidates, lse_neg, ws, s);
      case MACL_OPERAND_BF16:
        return launch_both_forward<__nv_bfloat16, LOGIT_MAP>(p, anchors, candidates, lse_neg,
                                                             ws, s);
      default: return cudaErrorInvalidValue;
    }
  }
  switch (p->operand) {
    case MACL_OPERAND_F32:
      return launch_forward<float, LOGIT_MAP>(p, anchors, candidates, lse_neg, ws, s);
    case MACL_OPERAND_F16:
      return launch_forward<__half, LOGIT_MAP>(p, anchors, candidates, lse_neg, ws, s);
    case MACL_OPERAND_BF16:
      return launch_forward<__nv_bfloat16, LOGIT_MAP>(p, anchors, candidates, lse_neg, ws, s);
    default: return cudaErrorInvalidValue;
  }
}

template <MaclLogitMap LOGIT_MAP>
cudaError_t backward_map(const MaclProblem* p, const void* anchors, const void* candidates,
                         const float* lse_neg, const float* g, float* d_anchors,
                         float* d_candidates, float* d_inv_temp, cudaStream_t s) {
  if (p->both_directions) {
    switch (p->operand) {
      case MACL_OPERAND_F32:
        return launch_both_backward<float, LOGIT_MAP>(p, anchors, candidates, lse_neg, g,
                                                      d_anchors, d_candidates, d_inv_temp, s);
      case MACL_OPERAND_F16:
        return launch_both_backward<__half, LOGIT_MAP>(p, anchors, candidates, lse_neg, g,
                                                       d_anchors, d_candidates, d_inv_temp, s);
      case MACL_OPERAND_BF16:
        return launch_both_backward<__nv_bfloat16, LOGIT_MAP>(
            p, anchors, candidates, lse_neg, g, d_anchors, d_candidates, d_inv_temp, s);
      default: return cudaErrorInvalidValue;
    }
  }
  switch (p->operand) {
    case MACL_OPERAND_F32:
      return launch_backward<float, LOGIT_MAP>(p, anchors, candidates, lse_neg, g, d_anchors,
                                               d_candidates, d_inv_temp, s);
    case MACL_OPERAND_F16:
      return launch_backward<__half, LOGIT_MAP>(p, anchors, candidates, lse_neg, g, d_anchors,
                                                d_candidates, d_inv_temp, s);
    case MACL_OPERAND_BF16:
      return launch_backward<__nv_bfloat16, LOGIT_MAP>(p, anchors, candidates, lse_neg, g,
                                                       d_anchors, d_candidates, d_inv_temp, s);
    default: return cudaErrorInvalidValue;
  }
}

// The checks of the binding, repeated for C callers: an unknown logit_map, a missing inv_temp
// (scaled map) or an artanh_scale / artanh_eps out of range (artanh map) is cudaErrorInvalidValue.
bool valid_logit_map(const MaclProblem* p) {
  switch (p->logit_map) {
    case MACL_LOGIT_MAP_SCALED: return p->inv_temp != nullptr;
    case MACL_LOGIT_MAP_ARTANH:
      return p->artanh_scale > 0.0 && p->artanh_eps > 0.0 && p->artanh_eps < 1.0;
    default: return false;
  }
}

bool valid_problem(const MaclProblem* p) {
  return p != nullptr && p->M >= 0 && p->K >= 0 && p->D >= 0 && p->pos_index != nullptr &&
         (p->anchor_labels == nullptr || p->candidate_labels != nullptr) &&
         valid_logit_map(p) && p->operand >= MACL_OPERAND_F32 &&
         p->operand <= MACL_OPERAND_F64 && cdiv(p->M + p->K, BM) < (int64_t(1) << 31);
}

}  // namespace

extern "C" size_t macl_cuda_forward_workspace(const MaclProblem* p) {
  if (p == nullptr || p->operand == MACL_OPERAND_F64 || p->M <= 0) return 0;
  // both_directions adds the columns' partials: 2 K cdiv(M, 64) floats.
  const int64_t columns = p->both_directions ? 2 * cdiv(p->M, BM) * p->K : 0;
  return static_cast<size_t>(2 * forward_splits(p->M, p->K) * p->M + columns);
}

extern "C" cudaError_t macl_cuda_forward(const MaclProblem* p, const void* anchors,
                                         const void* candidates, void* lse_neg, void* workspace,
                                         cudaStream_t stream) {
  if (!valid_problem(p)) return cudaErrorInvalidValue;
  if (p->M == 0) return cudaSuccess;
  if (p->operand == MACL_OPERAND_F64) {
    forward_f64<<<static_cast<unsigned>(cdiv(p->M, 128)), 128, 0, stream>>>(
        make_args64(p), static_cast<const double*>(anchors),
        static_cast<const double*>(candidates), static_cast<double*>(lse_neg));
    // both_directions on the plain float64 path: the columns as a second, transposed launch.
    if (p->both_directions && p->K > 0)
      forward_f64<<<static_cast<unsigned>(cdiv(p->K, 128)), 128, 0, stream>>>(
          make_mirrored_args64(p), static_cast<const double*>(candidates),
          static_cast<const double*>(anchors), static_cast<double*>(lse_neg) + p->M);
    return cudaGetLastError();
  }
  if (workspace == nullptr) return cudaErrorInvalidValue;
  float* lse = static_cast<float*>(lse_neg);
  float* ws = static_cast<float*>(workspace);
  return is_artanh(p)
             ? forward_map<MACL_LOGIT_MAP_ARTANH>(p, anchors, candidates, lse, ws, stream)
             : forward_map<MACL_LOGIT_MAP_SCALED>(p, anchors, candidates, lse, ws, stream);
}

extern "C" cudaError_t macl_cuda_backward(const MaclProblem* p, const void* anchors,
                                          const void* candidates, const void* lse_neg,
                                          const void* g, void* d_anchors, void* d_candidates,
                                          void* d_inv_temp, cudaStream_t stream) {
  if (!valid_problem(p)) return cudaErrorInvalidValue;
  if (is_artanh(p)) d_inv_temp = nullptr;  // no temperature in the artanh map
  if (p->M == 0) return cudaSuccess;
  if (p->operand == MACL_OPERAND_F64) {
    const double* A = static_cast<const double*>(anchors);
    const double* C = static_cast<const double*>(candidates);
    const double* lse = static_cast<const double*>(lse_neg);
    const double* g64 = static_cast<const double*>(g);
    double* dA = static_cast<double*>(d_anchors);
    double* dC = static_cast<double*>(d_candidates);
    double* dT = static_cast<double*>(d_inv_temp);
    launch_backward_f64(make_args64(p), A, C, lse, g64, dA, dC, dT, stream);
    // both_directions on the plain float64 path: the columns as a second, transposed launch
    // that adds to the same zero-filled gradients after the first (stream order: deterministic).
    if (p->both_directions && p->K > 0)
      launch_backward_f64(make_mirrored_args64(p), C, A, lse + p->M, g64 + p->M, dC, dA,
                          dT != nullptr ? dT + p->M : nullptr, stream);
    return cudaGetLastError();
  }
  const float* lse = static_cast<const float*>(lse_neg);
  const float* g32 = static_cast<const float*>(g);
  float* da = static_cast<float*>(d_anchors);
  float* dc = static_cast<float*>(d_candidates);
  float* dt = static_cast<float*>(d_inv_temp);
  return is_artanh(p)
             ? backward_map<MACL_LOGIT_MAP_ARTANH>(p, anchors, candidates, lse, g32, da, dc, dt,
                                                   stream)
             : backward_map<MACL_LOGIT_MAP_SCALED>(p, anchors, candidates, lse, g32, da, dc, dt,
                                                   stream);
}

extern "C" cudaError_t macl_cuda_softplus_forward(const MaclProblem* p, const void* anchors,
                                                  const void* candidates, const void* row_bias,
                                                  void* sp_neg, void* workspace,
                                                  cudaStream_t stream) {
  if (!valid_problem(p) || is_artanh(p)) return cudaErrorInvalidValue;
  if (p->M == 0) return cudaSuccess;
  if (p->operand == MACL_OPERAND_F64) {
    softplus_forward_f64<<<static_cast<unsigned>(cdiv(p->M, 128)), 128, 0, stream>>>(
        make_args64(p), static_cast<const double*>(anchors),
        static_cast<const double*>(candidates), static_cast<const double*>(row_bias),
        static_cast<double*>(sp_neg));
    return cudaGetLastError();
  }
  if (workspace == nullptr) return cudaErrorInvalidValue;
  const float* bias = static_cast<const float*>(row_bias);
  float* out = static_cast<float*>(sp_neg);
  float* ws = static_cast<float*>(workspace);
  switch (p->operand) {
    case MACL_OPERAND_F32:
      return launch_softplus_forward<float>(p, anchors, candidates, bias, out, ws, stream);
    case MACL_OPERAND_F16:
      return launch_softplus_forward<__half>(p, anchors, candidates, bias, out, ws, stream);
    case MACL_OPERAND_BF16:
      return launch_softplus_forward<__nv_bfloat16>(p, anchors, candidates, bias, out, ws,
                                                    stream);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t macl_cuda_softplus_backward(const MaclProblem* p, const void* anchors,
                                                   const void* candidates, const void* row_bias,
                                                   const void* g, void* d_anchors,
                                                   void* d_candidates, void* d_inv_temp,
                                                   void* d_row_bias, cudaStream_t stream) {
  if (!valid_problem(p) || is_artanh(p)) return cudaErrorInvalidValue;
  if (p->M == 0) return cudaSuccess;
  if (p->operand == MACL_OPERAND_F64) {
    const int64_t anchor_threads =
        (d_anchors != nullptr || d_inv_temp != nullptr || d_row_bias != nullptr)
            ? cdiv(p->M, 128) * 128
            : 0;
    const int64_t threads = anchor_threads + (d_candidates != nullptr ? p->K : 0);
    if (threads == 0) return cudaSuccess;
    softplus_backward_f64<<<static_cast<unsigned>(cdiv(threads, 128)), 128, 0, stream>>>(
        make_args64(p), static_cast<const double*>(anchors),
        static_cast<const double*>(candidates), static_cast<const double*>(row_bias),
        static_cast<const double*>(g), static_cast<double*>(d_anchors),
        static_cast<double*>(d_candidates), static_cast<double*>(d_inv_temp),
        static_cast<double*>(d_row_bias), anchor_threads);
    return cudaGetLastError();
  }
  const float* bias = static_cast<const float*>(row_bias);
  const float* g32 = static_cast<const float*>(g);
  float* da = static_cast<float*>(d_anchors);
  float* dc = static_cast<float*>(d_candidates);
  float* dt = static_cast<float*>(d_inv_temp);
  float* db = static_cast<float*>(d_row_bias);
  switch (p->operand) {
    case MACL_OPERAND_F32:
      return launch_softplus_backward<float>(p, anchors, candidates, bias, g32, da, dc, dt, db,
                                             stream);
    case MACL_OPERAND_F16:
      return launch_softplus_backward<__half>(p, anchors, candidates, bias, g32, da, dc, dt, db,
                                              stream);
    case MACL_OPERAND_BF16:
      return launch_softplus_backward<__nv_bfloat16>(p, anchors, candidates, bias, g32, da, dc,
                                                     dt, db, stream);
    default: return cudaErrorInvalidValue;
  }
}
