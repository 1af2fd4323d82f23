// CUDA kernels of backend "cuda": the contrastive primitive (SPEC.md sections 3-6).
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

// The precision of the GEMM operands A and C (statistics and gradients are always fp32, except
// MACL_OPERAND_F64, where everything is fp64: a simple, unoptimised path for float64 inputs).
enum MaclOperand {
  MACL_OPERAND_F32 = 0,   // fp32 CUDA-core tiles, fp32 FMA accumulation
  MACL_OPERAND_F16 = 1,   // fp16 tensor cores (WMMA), fp32 accumulation
  MACL_OPERAND_BF16 = 2,  // bf16 tensor cores (WMMA), fp32 accumulation
  MACL_OPERAND_F64 = 3,   // fp64 everywhere (one thread per row, no tiling)
};

// One call of the primitive: anchors A [M, D], candidates C [K, D], both row-major, contiguous,
// of the operand type. Row a's positive is candidate pos[a]; self[a] (when self != NULL) is the
// anchor itself among the candidates; both are left out of the sum.
// Logit map: artanh == 0 -> l_ak = inv_temp[a] * S_ak (inv_temp: M values of the compute type);
//            artanh != 0 -> l_ak = scale * artanh(clamp(S_ak, -1 + eps, 1 - eps)).
typedef struct MaclProblem {
  int64_t M, K, D;
  int operand;               // MaclOperand
  int artanh;                // 0: scaled map, else artanh map
  double scale, eps;         // the artanh map's c and e
  const void* inv_temp;      // [M] float (double for F64); scaled map only
  const int64_t* pos;        // [M]
  const int64_t* self;       // [M] or NULL
} MaclProblem;

// Floats (doubles for F64) of scratch that macl_cuda_forward needs: per-split partial max/sum.
size_t macl_cuda_forward_workspace(const MaclProblem* p);

// lse_neg[a] = log sum_{k in Neg(a)} exp(l_ak)   ([M], float or double for F64).
cudaError_t macl_cuda_forward(const MaclProblem* p, const void* A, const void* C, void* lse_neg,
                              void* workspace, cudaStream_t stream);

// Gradients of sum_a grad_lse[a] * lse_neg[a]. Each output pointer may be NULL (not needed);
// dA [M, D] and dC [K, D] must be zero-filled (the kernels accumulate into them, each element
// owned by one thread: deterministic, no atomics); d_inv_temp [M] is written (scaled map only).
cudaError_t macl_cuda_backward(const MaclProblem* p, const void* A, const void* C,
                               const void* lse_neg, const void* grad_lse, void* dA, void* dC,
                               void* d_inv_temp, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
