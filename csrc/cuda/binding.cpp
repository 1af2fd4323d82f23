// Torch binding of the CUDA kernels (extension macl_kernels._C_cuda, backend "cuda").
//
// Checks devices, dtypes, shapes and contiguity, rounds the GEMM operands to the operand dtype
// (the user's input precision: tensor cores for fp16 / bf16), allocates outputs and scratch,
// and calls the plain-C launchers of macl_cuda.cu on the current CUDA stream. The math lives in
// macl_cuda.cu; the autograd wiring in macl_kernels/backends/cuda.py.

#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

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

void check_index(const at::Tensor& idx, const at::Tensor& A, const char* name) {
  TORCH_CHECK(idx.device() == A.device(), name, " must be on the anchors' device");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.numel() == A.size(0) &&
                  idx.is_contiguous(),
              name, " must be a contiguous int64 vector with one entry per anchor row");
}

MaclProblem make_problem(const at::Tensor& A, const at::Tensor& C,
                         const c10::optional<at::Tensor>& inv_temp, const at::Tensor& pos,
                         const c10::optional<at::Tensor>& self, double artanh_scale,
                         double artanh_eps, int64_t operand) {
  TORCH_CHECK(A.is_cuda() && C.is_cuda() && A.device() == C.device(),
              "macl_kernels._C_cuda: anchors and candidates must be CUDA tensors on one device");
  TORCH_CHECK(A.dim() == 2 && C.dim() == 2 && A.size(1) == C.size(1),
              "anchors [M, D] and candidates [K, D] expected");
  TORCH_CHECK(A.scalar_type() == C.scalar_type(), "anchors and candidates differ in dtype");
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "the cuda backend computes in float32 or float64, got ", A.scalar_type());
  TORCH_CHECK(A.is_contiguous() && C.is_contiguous(), "contiguous anchors/candidates expected");
  const at::ScalarType op = operand_scalar_type(operand);
  TORCH_CHECK((op == at::kDouble) == (A.scalar_type() == at::kDouble),
              "float64 operands go with float64 compute and only with it (got operand ", op,
              " for ", A.scalar_type(), " inputs)");
  check_index(pos, A, "pos_index");
  const bool scaled = artanh_scale < 0;
  if (scaled) {
    TORCH_CHECK(inv_temp.has_value() && inv_temp->device() == A.device() &&
                    inv_temp->scalar_type() == A.scalar_type() && inv_temp->dim() == 1 &&
                    inv_temp->numel() == A.size(0) && inv_temp->is_contiguous(),
                "the scaled map needs a contiguous inv_temp [M] of the anchors' dtype and device");
  }
  if (self.has_value()) check_index(*self, A, "self_index");
  MaclProblem p;
  p.M = A.size(0);
  p.K = C.size(0);
  p.D = A.size(1);
  p.operand = static_cast<int>(operand);
  p.artanh = scaled ? 0 : 1;
  p.scale = scaled ? 0.0 : artanh_scale;
  p.eps = artanh_eps;
  p.inv_temp = scaled ? inv_temp->data_ptr() : nullptr;
  p.pos = pos.data_ptr<int64_t>();
  p.self = self.has_value() ? self->data_ptr<int64_t>() : nullptr;
  return p;
}

// The operands in the operand dtype; one conversion when anchors are the candidates (layout 2n).
std::pair<at::Tensor, at::Tensor> operands(const at::Tensor& A, const at::Tensor& C,
                                           int64_t operand) {
  const at::ScalarType op = operand_scalar_type(operand);
  at::Tensor A_op = A.to(op).contiguous();
  at::Tensor C_op = C.is_same(A) ? A_op : C.to(op).contiguous();
  return {A_op, C_op};
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "macl_kernels._C_cuda: ", what, " failed: ",
              cudaGetErrorString(err));
}

at::Tensor forward(const at::Tensor& anchors, const at::Tensor& candidates,
                   const c10::optional<at::Tensor>& inv_temp, const at::Tensor& pos_index,
                   const c10::optional<at::Tensor>& self_index, double artanh_scale,
                   double artanh_eps, int64_t operand) {
  const MaclProblem p = make_problem(anchors, candidates, inv_temp, pos_index, self_index,
                                     artanh_scale, artanh_eps, operand);
  const c10::cuda::CUDAGuard guard(anchors.device());
  auto ops = operands(anchors, candidates, operand);
  at::Tensor lse = at::empty({p.M}, anchors.options());
  const size_t ws_floats = macl_cuda_forward_workspace(&p);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_floats > 0 ? ws_floats : 1)},
                            anchors.options().dtype(at::kFloat));
  check_launch(macl_cuda_forward(&p, ops.first.data_ptr(), ops.second.data_ptr(),
                                 lse.data_ptr(), ws.data_ptr(),
                                 c10::cuda::getCurrentCUDAStream()),
               "forward");
  return lse;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& anchors, const at::Tensor& candidates,
    const c10::optional<at::Tensor>& inv_temp, const at::Tensor& pos_index,
    const c10::optional<at::Tensor>& self_index, const at::Tensor& lse_neg,
    const at::Tensor& grad_lse_neg, double artanh_scale, double artanh_eps, int64_t operand,
    bool need_anchors, bool need_candidates, bool need_inv_temp) {
  const MaclProblem p = make_problem(anchors, candidates, inv_temp, pos_index, self_index,
                                     artanh_scale, artanh_eps, operand);
  for (const at::Tensor* t : {&lse_neg, &grad_lse_neg}) {
    TORCH_CHECK(t->device() == anchors.device() && t->scalar_type() == anchors.scalar_type() &&
                    t->dim() == 1 && t->numel() == p.M && t->is_contiguous(),
                "lse_neg and grad_lse_neg must be contiguous [M] vectors like the anchors");
  }
  const c10::cuda::CUDAGuard guard(anchors.device());
  need_inv_temp = need_inv_temp && p.artanh == 0;
  at::Tensor dA, dC, db;
  if (need_anchors) dA = at::zeros_like(anchors);
  if (need_candidates) dC = at::zeros_like(candidates);
  if (need_inv_temp) db = at::zeros({p.M}, anchors.options());
  if (!(need_anchors || need_candidates || need_inv_temp)) return {dA, dC, db};
  auto ops = operands(anchors, candidates, operand);
  check_launch(macl_cuda_backward(&p, ops.first.data_ptr(), ops.second.data_ptr(),
                                  lse_neg.data_ptr(), grad_lse_neg.data_ptr(),
                                  need_anchors ? dA.data_ptr() : nullptr,
                                  need_candidates ? dC.data_ptr() : nullptr,
                                  need_inv_temp ? db.data_ptr() : nullptr,
                                  c10::cuda::getCurrentCUDAStream()),
               "backward");
  return {dA, dC, db};
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
  m.def("forward", &forward, "lse_neg of every anchor row", py::arg("anchors"),
        py::arg("candidates"), py::arg("inv_temp"), py::arg("pos_index"),
        py::arg("self_index"), py::arg("artanh_scale"), py::arg("artanh_eps"),
        py::arg("operand"));
  m.def("backward", &backward, "gradients of lse_neg: (d anchors, d candidates, d inv_temp)",
        py::arg("anchors"), py::arg("candidates"), py::arg("inv_temp"), py::arg("pos_index"),
        py::arg("self_index"), py::arg("lse_neg"), py::arg("grad_lse_neg"),
        py::arg("artanh_scale"), py::arg("artanh_eps"), py::arg("operand"),
        py::arg("need_anchors"), py::arg("need_candidates"), py::arg("need_inv_temp"));
}
