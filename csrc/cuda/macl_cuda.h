// CUDA kernels of backend "cuda": the contrastive primitive of docs/math.md, section "The
// primitive", with the names that Python, Triton and the C++ kernels use for it as well.
//
// Plain C interface (CUDA runtime types only, no PyTorch): the torch binding (binding.cpp)
// checks and converts tensors, then calls these launchers with raw pointers on its stream.
// See macl_cuda.cu for the math and the kernel design.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The precision of the GEMM operands, anchors and candidates (statistics and gradients are
// always fp32, except MACL_OPERAND_F64, where everything is fp64: a simple, unoptimised path for
// float64 inputs).
enum MaclOperand {
  MACL_OPERAND_F32 = 0,   // fp32 CUDA-core tiles, fp32 FMA accumulation
  MACL_OPERAND_F16 = 1,   // fp16 tensor cores (WMMA), fp32 accumulation
  MACL_OPERAND_BF16 = 2,  // bf16 tensor cores (WMMA), fp32 accumulation
  MACL_OPERAND_F64 = 3,   // fp64 everywhere (one thread per row, no tiling)
};

// How a similarity S_ak becomes a logit l_ak (the values of Python's LogitMap, Triton's
// LOGIT_MAP constexpr and the C++ kernels' LogitMap). Any other value is refused.
enum MaclLogitMap {
  MACL_LOGIT_MAP_SCALED = 0,  // l_ak = inv_temp[a] * S_ak
  MACL_LOGIT_MAP_ARTANH = 1,  // l_ak = artanh_scale * artanh(clamp(S_ak, -1 + artanh_eps,
                              //                                     1 - artanh_eps))
};

// What a row's negatives reduce to (Python's RowReduction, Triton's ROW_REDUCTION, the C++
// kernels' RowReduction). The log-sum-exp is macl_cuda_forward / macl_cuda_backward; the sum of
// softplus (SigLIP) is macl_cuda_softplus_forward / macl_cuda_softplus_backward.
enum MaclRowReduction {
  MACL_ROW_REDUCTION_LSE = 0,       // lse_neg[a] = log sum_{k in Neg(a)} exp(l_ak)
  MACL_ROW_REDUCTION_SOFTPLUS = 1,  // sp_neg[a] = sum_{k in Neg(a)} softplus(l_ak)
};

// One call of the primitive: anchors [M, D], candidates [K, D], both row-major, contiguous, of
// the operand type (the same pointer for both when the problem is symmetric). Row a's positive
// is candidate pos_index[a]; self_index[a] (when self_index != NULL) is the anchor itself among
// the candidates; both are left out of the sum.
//
// both_directions (layout cross_sym on one process): the columns of S are anchors too (candidate
// k against every anchor). inv_temp, pos_index, self_index, lse_neg, g and d_inv_temp then have
// M + K entries: the rows' first (indices into the candidates), then the columns' (indices into
// the anchors), and every tile of S serves both directions (docs/math.md, "Both directions of
// one S"). Set it to 0 otherwise.
typedef struct MaclProblem {
  int64_t M, K, D;
  int operand;                       // MaclOperand
  int logit_map;                     // MaclLogitMap
  double artanh_scale, artanh_eps;   // MACL_LOGIT_MAP_ARTANH: > 0, and in (0, 1)
  const void* inv_temp;              // [M] float (double for F64); MACL_LOGIT_MAP_SCALED only
  const int64_t* pos_index;          // [M]
  const int64_t* self_index;         // [M] or NULL
  // Label mask: candidate k is not in Neg(a) when candidate_labels[k] == anchor_labels[a].
  const int64_t* anchor_labels;      // [M] or NULL (then candidate_labels is unused)
  const int64_t* candidate_labels;   // [K]
  int both_directions;               // 0 or 1; 1: the per-anchor arrays have M + K entries
} MaclProblem;

// Floats (doubles for F64) of scratch that macl_cuda_forward needs: per-split partial max/sum
// (both_directions: plus the columns' per-anchor-block partials, 2 K cdiv(M, 64) floats).
size_t macl_cuda_forward_workspace(const MaclProblem* p);

// The launchers return cudaErrorInvalidValue for a problem they refuse (an unknown logit_map or
// operand, a missing inv_temp or pos_index, artanh_scale / artanh_eps out of range), else the
// launch's error.

// lse_neg[a] = log sum_{k in Neg(a)} exp(l_ak)   ([M] or, both_directions, [M + K]; float or
// double for F64).
cudaError_t macl_cuda_forward(const MaclProblem* p, const void* anchors, const void* candidates,
                              void* lse_neg, void* workspace, cudaStream_t stream);

// Gradients of sum_a g[a] * lse_neg[a] (g = dL/d lse_neg, [M]). Each output pointer may be NULL
// (not needed); d_anchors [M, D] and d_candidates [K, D] must be zero-filled (the kernels
// accumulate into them, each element owned by one thread: deterministic, no atomics);
// d_inv_temp [M] (both_directions: [M + K], as g) is written (MACL_LOGIT_MAP_SCALED only;
// ignored for the artanh map).
cudaError_t macl_cuda_backward(const MaclProblem* p, const void* anchors, const void* candidates,
                               const void* lse_neg, const void* g, void* d_anchors,
                               void* d_candidates, void* d_inv_temp, cudaStream_t stream);

// The softplus row reduction (SigLIP; MACL_LOGIT_MAP_SCALED only, distinct candidates):
// l_ak = inv_temp[a] * S_ak + row_bias[a] (row_bias [M] float, double for F64, or NULL: 0),
// sp_neg[a] = sum_{k in Neg(a)} softplus(l_ak) ([M]). Scratch: macl_cuda_forward_workspace(p).
cudaError_t macl_cuda_softplus_forward(const MaclProblem* p, const void* anchors,
                                       const void* candidates, const void* row_bias,
                                       void* sp_neg, void* workspace, cudaStream_t stream);

// Gradients of sum_a g[a] * sp_neg[a]: dL_dl_ak = g[a] sigmoid(l_ak) on Neg(a) (no forward
// statistic). As macl_cuda_backward, plus d_row_bias [M] (written; may be NULL).
cudaError_t macl_cuda_softplus_backward(const MaclProblem* p, const void* anchors,
                                        const void* candidates, const void* row_bias,
                                        const void* g, void* d_anchors, void* d_candidates,
                                        void* d_inv_temp, void* d_row_bias,
                                        cudaStream_t stream);

#ifdef __cplusplus
}
#endif
