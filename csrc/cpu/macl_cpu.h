// Kernel interface of backend "cpu": the contrastive primitive of docs/math.md, section "The
// primitive", in the glossary's names (docs/design.md), the same as Python, Triton and CUDA.
//
// Plain interface (raw pointers and sizes, no tensor type): the torch binding (binding.cpp)
// checks and converts tensors, allocates the outputs and calls these kernels; the kernels
// (macl_cpu_kernels.cpp, which describes the math and the tiling) use ATen only for its thread
// pool (at::parallel_for) and as the fallback of the tile GEMMs. Every input and output is a
// contiguous row-major array of the compute dtype T (float or double; the kernels are
// instantiated for both), except the int64 index and label arrays.
#pragma once

#include <cstdint>

namespace macl_cpu {

// How a similarity S_ak becomes a logit l_ak; the values are macl_kernels.LogitMap's (and
// Triton's LOGIT_MAP, CUDA's MACL_LOGIT_MAP_*).
enum class LogitMap : int64_t { Scaled = 0, Artanh = 1 };

// What a row's negatives reduce to; the values are macl_kernels.RowReduction's (and Triton's
// ROW_REDUCTION, CUDA's MACL_ROW_REDUCTION_*).
enum class RowReduction : int64_t { Lse = 0, Softplus = 1 };

// One call of the primitive: anchors [M, D] against candidates [K, D]. Row a's positive is
// candidate pos_index[a]; self_index[a] (when self_index is not null) is the anchor itself among
// the candidates; both are left out of Neg(a), and so is, with a label mask, every candidate k
// with candidate_labels[k] == anchor_labels[a].
//
// symmetric (layout 2n on one process): the candidates are the anchors (one pointer, K = M).
// both_directions (layout cross_sym on one process): the columns of S are anchors too; the
// per-anchor arrays (inv_temp, pos_index, self_index, lse_neg, g, d_inv_temp) then have M + K
// entries, the rows' first (indices into the candidates), then the columns' (indices into the
// anchors). The two exclude each other.
struct Problem {
  int64_t M, K, D;
  LogitMap logit_map;
  double artanh_scale, artanh_eps;  // LogitMap::Artanh's scale and clamp
  bool symmetric;
  bool both_directions;  // the columns are anchors too (entries M..M+K of the per-anchor arrays)
  const int64_t* pos_index;
  const int64_t* self_index;        // nullptr: no self among the candidates
  const int64_t* anchor_labels;     // nullptr: no label mask
  const int64_t* candidate_labels;  // the anchors' labels when symmetric

  bool scaled() const { return logit_map == LogitMap::Scaled; }
  // Entries of lse_neg and of the per-anchor arrays.
  int64_t num_lse() const { return both_directions ? M + K : M; }
  // Where a column's entries start in the per-anchor arrays: symmetric, the column k is anchor
  // k; both_directions, anchor M + k.
  int64_t column_offset() const { return both_directions ? M : 0; }
};

// lse_neg[a] = log sum_{k in Neg(a)} exp(l_ak) for the num_lse() anchors (written; -inf for an
// empty Neg(a)); with eqs not null also eqs[a] = sum_{k in Neg(a)} Q_ak S_ak (written; 0 for an
// empty Neg(a)). inv_temp: num_lse() entries, LogitMap::Scaled only (else unused).
template <typename T>
void forward(const Problem& p, const T* anchors, const T* candidates, const T* inv_temp,
             T* lse_neg, T* eqs);

// Gradients of sum_a g[a] lse_neg[a] (lse_neg, g: num_lse() entries). The outputs must be
// zero-filled; each may be null (not needed): d_anchors [M, D] (symmetric: the whole gradient of
// the one tensor, never null), d_candidates [K, D] (unused when symmetric), d_inv_temp
// [num_lse()] (LogitMap::Scaled only). Accumulated in per-thread partial sums merged in thread
// order: no atomics, the same bits for a given thread count.
template <typename T>
void backward(const Problem& p, const T* anchors, const T* candidates, const T* inv_temp,
              const T* lse_neg, const T* g, T* d_anchors, T* d_candidates, T* d_inv_temp);

// RowReduction::Softplus (SigLIP; LogitMap::Scaled, distinct candidates, no labels):
// l_ak = inv_temp[a] S_ak + row_bias[a] (row_bias null: 0), sp_neg[a] = sum_{k in Neg(a)}
// softplus(l_ak) ([M], zero-filled, accumulated). aux null, or the gradients' tile sums for a
// backward without a second pass (zero-filled, M D + 2 M + K D entries; layout in
// macl_cpu_kernels.cpp, softplus_forward).
template <typename T>
void softplus_forward(const Problem& p, const T* anchors, const T* candidates, const T* inv_temp,
                      const T* row_bias, T* sp_neg, T* aux);

// Gradients of sum_a g[a] sp_neg[a] ([M] g): as backward, plus d_row_bias [M]; every output
// zero-filled or null (not needed).
template <typename T>
void softplus_backward(const Problem& p, const T* anchors, const T* candidates,
                       const T* inv_temp, const T* row_bias, const T* g, T* d_anchors,
                       T* d_candidates, T* d_inv_temp, T* d_row_bias);

}  // namespace macl_cpu
