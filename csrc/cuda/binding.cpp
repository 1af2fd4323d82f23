// Torch binding of the CUDA kernels (extension macl_kernels._C_cuda, backend "cuda").
//
// Checks devices, dtypes, shapes and contiguity and the logit map (logit_map: 0 scaled, 1
// artanh, as MaclLogitMap and Python's LogitMap), rounds the GEMM operands to the operand dtype
// (the user's input precision: tensor cores for fp16 / bf16), allocates outputs and scratch,
// and calls the plain-C launchers of macl_cuda.cu on the current CUDA stream. The math:
// docs/math.md, section "The primitive" (names as there); the kernels: macl_cuda.cu; the
// caller: macl_kernels/primitive/backends/cuda.py. Argument order, the same in both bindings
// (csrc/cpu/binding.cpp): the tensors, the logit map and its parameters, then the layout flags
// (cpu: symmetric; cuda: operand; then both_directions), then the need_* flags of Needs
// (d_anchors, d_candidates, d_inv_temp[, d_row_bias]), then the optional label tensors.

#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <tuple>

#include "macl_cuda.h"

namespace {

// Operand codes as passed from Python (MaclOperand).
at::ScalarType operand_scalar_type(int64_t operand) {
  switch (operand) {
    case MACL_OPERAND_F32: return at::kFloat;
    case MACL_OPERAND_F16: return at::kHalf;
    case MACL_OPERAND_BF16: return at::kBFloat16;
    case MACL_OPERAND_F64: return at::kDouble;
    default: TORCH_CHECK(false, "macl_kernels._C_cuda: unknown operand code ", operand);
  }
  return at::kFloat;  // unreachable
}

// num_lse: entries of the per-anchor arrays, M (both_directions: M + K).
void check_index(const at::Tensor& index, const at::Tensor& anchors, int64_t num_lse,
                 const char* name) {
  TORCH_CHECK(index.device() == anchors.device(), name, " must be on the anchors' device");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 &&
                  index.numel() == num_lse && index.is_contiguous(),
              name, " must be a contiguous int64 vector with one entry per anchor row (",
              num_lse, "; both_directions: M + K)");
}

// The logit map code as passed from Python (LogitMap, MaclLogitMap) and its parameters.
MaclLogitMap checked_logit_map(int64_t logit_map, double artanh_scale, double artanh_eps) {
  TORCH_CHECK(logit_map == MACL_LOGIT_MAP_SCALED || logit_map == MACL_LOGIT_MAP_ARTANH,
              "logit_map must be 0 (scaled) or 1 (artanh), got ", logit_map);
  if (logit_map == MACL_LOGIT_MAP_ARTANH) {
    TORCH_CHECK(artanh_scale > 0, "the artanh logit map needs artanh_scale > 0, got ",
                artanh_scale);
    TORCH_CHECK(artanh_eps > 0 && artanh_eps < 1,
                "the artanh logit map needs 0 < artanh_eps < 1, got ", artanh_eps);
  }
  return static_cast<MaclLogitMap>(logit_map);
}

MaclProblem make_problem(const at::Tensor& anchors, const at::Tensor& candidates,
                         const c10::optional<at::Tensor>& inv_temp, const at::Tensor& pos_index,
                         const c10::optional<at::Tensor>& self_index, int64_t logit_map,
                         double artanh_scale, double artanh_eps, int64_t operand,
                         bool both_directions = false,
                         const c10::optional<at::Tensor>& anchor_labels = c10::nullopt,
                         const c10::optional<at::Tensor>& candidate_labels = c10::nullopt) {
  TORCH_CHECK(anchors.is_cuda() && candidates.is_cuda() &&
                  anchors.device() == candidates.device(),
              "macl_kernels._C_cuda: anchors and candidates must be CUDA tensors on one device");
  TORCH_CHECK(anchors.dim() == 2 && candidates.dim() == 2 &&
                  anchors.size(1) == candidates.size(1),
              "anchors [M, D] and candidates [K, D] expected");
  TORCH_CHECK(anchors.scalar_type() == candidates.scalar_type(),
              "anchors and candidates differ in dtype");
  TORCH_CHECK(anchors.scalar_type() == at::kFloat || anchors.scalar_type() == at::kDouble,
              "the cuda backend computes in float32 or float64, got ", anchors.scalar_type());
  TORCH_CHECK(anchors.is_contiguous() && candidates.is_contiguous(),
              "contiguous anchors/candidates expected");
  const at::ScalarType op = operand_scalar_type(operand);
  TORCH_CHECK((op == at::kDouble) == (anchors.scalar_type() == at::kDouble),
              "float64 operands go with float64 compute and only with it (got operand ", op,
              " for ", anchors.scalar_type(), " inputs)");
  const MaclLogitMap map = checked_logit_map(logit_map, artanh_scale, artanh_eps);
  const int64_t num_lse = anchors.size(0) + (both_directions ? candidates.size(0) : 0);
  check_index(pos_index, anchors, num_lse, "pos_index");
  const bool scaled = map == MACL_LOGIT_MAP_SCALED;
  if (scaled) {
    TORCH_CHECK(inv_temp.has_value() && inv_temp->device() == anchors.device() &&
                    inv_temp->scalar_type() == anchors.scalar_type() && inv_temp->dim() == 1 &&
                    inv_temp->numel() == num_lse && inv_temp->is_contiguous(),
                "the scaled logit map needs a contiguous inv_temp [M] (both_directions: "
                "[M + K]) of the anchors' dtype and device");
  }
  if (self_index.has_value()) check_index(*self_index, anchors, num_lse, "self_index");
  TORCH_CHECK(anchor_labels.has_value() == candidate_labels.has_value(),
              "anchor_labels and candidate_labels go together");
  TORCH_CHECK(!(both_directions && anchor_labels.has_value()),
              "both_directions takes no labels (Python runs two calls then)");
  if (anchor_labels.has_value()) {
    check_index(*anchor_labels, anchors, anchors.size(0), "anchor_labels");
    check_index(*candidate_labels, anchors, candidates.size(0), "candidate_labels");
  }
  MaclProblem p;
  p.M = anchors.size(0);
  p.K = candidates.size(0);
  p.D = anchors.size(1);
  p.operand = static_cast<int>(operand);
  p.logit_map = static_cast<int>(map);
  p.artanh_scale = scaled ? 0.0 : artanh_scale;
  p.artanh_eps = scaled ? 0.0 : artanh_eps;
  p.inv_temp = scaled ? inv_temp->data_ptr() : nullptr;
  p.pos_index = pos_index.data_ptr<int64_t>();
  p.self_index = self_index.has_value() ? self_index->data_ptr<int64_t>() : nullptr;
  p.both_directions = both_directions ? 1 : 0;
  p.anchor_labels = anchor_labels.has_value() ? anchor_labels->data_ptr<int64_t>() : nullptr;
  p.candidate_labels =
      candidate_labels.has_value() ? candidate_labels->data_ptr<int64_t>() : nullptr;
  return p;
}

// The operands in the operand dtype; one conversion when the problem is symmetric (the
// candidates are the anchors: layout 2n).
std::pair<at::Tensor, at::Tensor> operands(const at::Tensor& anchors,
                                           const at::Tensor& candidates, int64_t operand) {
  const at::ScalarType op = operand_scalar_type(operand);
  const bool symmetric = candidates.is_same(anchors);
  at::Tensor anchors_op = anchors.to(op).contiguous();
  at::Tensor candidates_op = symmetric ? anchors_op : candidates.to(op).contiguous();
  return {anchors_op, candidates_op};
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "macl_kernels._C_cuda: ", what, " failed: ",
              cudaGetErrorString(err));
}

at::Tensor forward(const at::Tensor& anchors, const at::Tensor& candidates,
                   const c10::optional<at::Tensor>& inv_temp, const at::Tensor& pos_index,
                   const c10::optional<at::Tensor>& self_index, int64_t logit_map,
                   double artanh_scale, double artanh_eps, int64_t operand,
                   bool both_directions, const c10::optional<at::Tensor>& anchor_labels,
                   const c10::optional<at::Tensor>& candidate_labels) {
  const MaclProblem p = make_problem(anchors, candidates, inv_temp, pos_index, self_index,
                                     logit_map, artanh_scale, artanh_eps, operand,
                                     both_directions, anchor_labels, candidate_labels);
  const c10::cuda::CUDAGuard guard(anchors.device());
  auto ops = operands(anchors, candidates, operand);
  const int64_t num_lse = p.M + (both_directions ? p.K : 0);
  // No anchor rows: the columns (both_directions) have no negatives, lse_neg = -inf.
  at::Tensor lse_neg = p.M == 0 ? at::full({num_lse}, -std::numeric_limits<double>::infinity(),
                                           anchors.options())
                                : at::empty({num_lse}, anchors.options());
  const size_t ws_floats = macl_cuda_forward_workspace(&p);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_floats > 0 ? ws_floats : 1)},
                            anchors.options().dtype(at::kFloat));
  check_launch(macl_cuda_forward(&p, ops.first.data_ptr(), ops.second.data_ptr(),
                                 lse_neg.data_ptr(), ws.data_ptr(),
                                 c10::cuda::getCurrentCUDAStream()),
               "forward");
  return lse_neg;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& anchors, const at::Tensor& candidates,
    const c10::optional<at::Tensor>& inv_temp, const at::Tensor& pos_index,
    const c10::optional<at::Tensor>& self_index, const at::Tensor& lse_neg, const at::Tensor& g,
    int64_t logit_map, double artanh_scale, double artanh_eps, int64_t operand,
    bool both_directions, bool need_d_anchors, bool need_d_candidates, bool need_d_inv_temp,
    const c10::optional<at::Tensor>& anchor_labels,
    const c10::optional<at::Tensor>& candidate_labels) {
  const MaclProblem p = make_problem(anchors, candidates, inv_temp, pos_index, self_index,
                                     logit_map, artanh_scale, artanh_eps, operand,
                                     both_directions, anchor_labels, candidate_labels);
  const int64_t num_lse = p.M + (both_directions ? p.K : 0);
  for (const at::Tensor* t : {&lse_neg, &g}) {
    TORCH_CHECK(t->device() == anchors.device() && t->scalar_type() == anchors.scalar_type() &&
                    t->dim() == 1 && t->numel() == num_lse && t->is_contiguous(),
                "lse_neg and g must be contiguous [M] (both_directions: [M + K]) vectors like "
                "the anchors");
  }
  const c10::cuda::CUDAGuard guard(anchors.device());
  // No temperature in the artanh map: no d_inv_temp.
  need_d_inv_temp = need_d_inv_temp && p.logit_map == MACL_LOGIT_MAP_SCALED;
  at::Tensor d_anchors, d_candidates, d_inv_temp;
  if (need_d_anchors) d_anchors = at::zeros_like(anchors);
  if (need_d_candidates) d_candidates = at::zeros_like(candidates);
  if (need_d_inv_temp) d_inv_temp = at::zeros({num_lse}, anchors.options());
  if (!(need_d_anchors || need_d_candidates || need_d_inv_temp))
    return {d_anchors, d_candidates, d_inv_temp};
  auto ops = operands(anchors, candidates, operand);
  check_launch(macl_cuda_backward(&p, ops.first.data_ptr(), ops.second.data_ptr(),
                                  lse_neg.data_ptr(), g.data_ptr(),
                                  need_d_anchors ? d_anchors.data_ptr() : nullptr,
                                  need_d_candidates ? d_candidates.data_ptr() : nullptr,
                                  need_d_inv_temp ? d_inv_temp.data_ptr() : nullptr,
                                  c10::cuda::getCurrentCUDAStream()),
               "backward");
  return {d_anchors, d_candidates, d_inv_temp};
}


// The softplus row reduction (SigLIP): row_bias [M] of the anchors' dtype, or None.
void check_row_bias(const c10::optional<at::Tensor>& row_bias, const at::Tensor& anchors) {
  if (!row_bias.has_value()) return;
  TORCH_CHECK(row_bias->device() == anchors.device() &&
                  row_bias->scalar_type() == anchors.scalar_type() && row_bias->dim() == 1 &&
                  row_bias->numel() == anchors.size(0) && row_bias->is_contiguous(),
              "row_bias must be a contiguous [M] vector of the anchors' dtype and device");
}

at::Tensor softplus_forward(const at::Tensor& anchors, const at::Tensor& candidates,
                            const c10::optional<at::Tensor>& inv_temp,
                            const c10::optional<at::Tensor>& row_bias,
                            const at::Tensor& pos_index,
                            const c10::optional<at::Tensor>& self_index, int64_t operand) {
  const MaclProblem p = make_problem(anchors, candidates, inv_temp, pos_index, self_index,
                                     MACL_LOGIT_MAP_SCALED, 0.0, 0.0, operand);
  check_row_bias(row_bias, anchors);
  const c10::cuda::CUDAGuard guard(anchors.device());
  auto ops = operands(anchors, candidates, operand);
  at::Tensor sp_neg = at::empty({p.M}, anchors.options());
  const size_t ws_floats = macl_cuda_forward_workspace(&p);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_floats > 0 ? ws_floats : 1)},
                            anchors.options().dtype(at::kFloat));
  check_launch(macl_cuda_softplus_forward(
                   &p, ops.first.data_ptr(), ops.second.data_ptr(),
                   row_bias.has_value() ? row_bias->data_ptr() : nullptr, sp_neg.data_ptr(),
                   ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "softplus forward");
  return sp_neg;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softplus_backward(
    const at::Tensor& anchors, const at::Tensor& candidates,
    const c10::optional<at::Tensor>& inv_temp, const c10::optional<at::Tensor>& row_bias,
    const at::Tensor& pos_index, const c10::optional<at::Tensor>& self_index, const at::Tensor& g,
    int64_t operand, bool need_d_anchors, bool need_d_candidates, bool need_d_inv_temp,
    bool need_d_row_bias) {
  const MaclProblem p = make_problem(anchors, candidates, inv_temp, pos_index, self_index,
                                     MACL_LOGIT_MAP_SCALED, 0.0, 0.0, operand);
  check_row_bias(row_bias, anchors);
  TORCH_CHECK(g.device() == anchors.device() && g.scalar_type() == anchors.scalar_type() &&
                  g.dim() == 1 && g.numel() == p.M && g.is_contiguous(),
              "g must be a contiguous [M] vector like the anchors");
  const c10::cuda::CUDAGuard guard(anchors.device());
  need_d_row_bias = need_d_row_bias && row_bias.has_value();
  at::Tensor d_anchors, d_candidates, d_inv_temp, d_row_bias;
  if (need_d_anchors) d_anchors = at::zeros_like(anchors);
  if (need_d_candidates) d_candidates = at::zeros_like(candidates);
  if (need_d_inv_temp) d_inv_temp = at::zeros({p.M}, anchors.options());
  if (need_d_row_bias) d_row_bias = at::zeros({p.M}, anchors.options());
  if (!(need_d_anchors || need_d_candidates || need_d_inv_temp || need_d_row_bias))
    return {d_anchors, d_candidates, d_inv_temp, d_row_bias};
  auto ops = operands(anchors, candidates, operand);
  check_launch(macl_cuda_softplus_backward(
                   &p, ops.first.data_ptr(), ops.second.data_ptr(),
                   row_bias.has_value() ? row_bias->data_ptr() : nullptr, g.data_ptr(),
                   need_d_anchors ? d_anchors.data_ptr() : nullptr,
                   need_d_candidates ? d_candidates.data_ptr() : nullptr,
                   need_d_inv_temp ? d_inv_temp.data_ptr() : nullptr,
                   need_d_row_bias ? d_row_bias.data_ptr() : nullptr,
                   c10::cuda::getCurrentCUDAStream()),
               "softplus backward");
  return {d_anchors, d_candidates, d_inv_temp, d_row_bias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "macl-kernels CUDA kernels (tiled fp32 CUDA-core / fp16-bf16 tensor-core GEMMs)";
#ifdef MACL_BUILT_WITH_TORCH
  m.attr("built_with_torch") = MACL_BUILT_WITH_TORCH;  // so a mismatch can be named on load
#endif
  m.attr("OPERAND_F32") = static_cast<int>(MACL_OPERAND_F32);
  m.attr("OPERAND_F16") = static_cast<int>(MACL_OPERAND_F16);
  m.attr("OPERAND_BF16") = static_cast<int>(MACL_OPERAND_BF16);
  m.attr("OPERAND_F64") = static_cast<int>(MACL_OPERAND_F64);
  m.attr("LOGIT_MAP_SCALED") = static_cast<int>(MACL_LOGIT_MAP_SCALED);
  m.attr("LOGIT_MAP_ARTANH") = static_cast<int>(MACL_LOGIT_MAP_ARTANH);
  m.def("forward", &forward, "lse_neg of every anchor row", py::arg("anchors"),
        py::arg("candidates"), py::arg("inv_temp"), py::arg("pos_index"),
        py::arg("self_index"), py::arg("logit_map"), py::arg("artanh_scale"),
        py::arg("artanh_eps"), py::arg("operand"), py::arg("both_directions") = false,
        py::arg("anchor_labels") = py::none(), py::arg("candidate_labels") = py::none());
  m.def("backward", &backward,
        "gradients of sum_a g[a] * lse_neg[a]: (d_anchors, d_candidates, d_inv_temp)",
        py::arg("anchors"), py::arg("candidates"), py::arg("inv_temp"), py::arg("pos_index"),
        py::arg("self_index"), py::arg("lse_neg"), py::arg("g"), py::arg("logit_map"),
        py::arg("artanh_scale"), py::arg("artanh_eps"), py::arg("operand"),
        py::arg("both_directions"), py::arg("need_d_anchors"), py::arg("need_d_candidates"),
        py::arg("need_d_inv_temp"), py::arg("anchor_labels") = py::none(),
        py::arg("candidate_labels") = py::none());
  m.def("softplus_forward", &softplus_forward,
        "sp_neg of every anchor row (sum of softplus over Neg(a), SigLIP)", py::arg("anchors"),
        py::arg("candidates"), py::arg("inv_temp"), py::arg("row_bias"), py::arg("pos_index"),
        py::arg("self_index"), py::arg("operand"));
  m.def("softplus_backward", &softplus_backward,
        "gradients of sum_a g[a] * sp_neg[a]: (d_anchors, d_candidates, d_inv_temp, d_row_bias)",
        py::arg("anchors"), py::arg("candidates"), py::arg("inv_temp"), py::arg("row_bias"),
        py::arg("pos_index"), py::arg("self_index"), py::arg("g"), py::arg("operand"),
        py::arg("need_d_anchors"), py::arg("need_d_candidates"), py::arg("need_d_inv_temp"),
        py::arg("need_d_row_bias"));
}
