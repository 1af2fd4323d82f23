// Torch binding of the C++ kernels (extension macl_kernels._C_cpu, backend "cpu").
//
// Checks devices, dtypes, shapes and contiguity and the logit map (logit_map: 0 scaled, 1
// artanh, as macl_cpu::LogitMap and Python's LogitMap), converts the tensors to a
// macl_cpu::Problem and raw pointers, allocates the outputs (zero-filled where the kernels
// accumulate) and calls the kernels of macl_cpu_kernels.cpp for the tensors' dtype (float32 or
// float64). The math: docs/math.md, section "The primitive" (names as there); the interface:
// macl_cpu.h; the caller: macl_kernels/primitive/backends/cpu.py. Argument order, the same in
// both bindings (csrc/cuda/binding.cpp; docs/design.md, glossary): the tensors, the logit map
// and its parameters, the layout flags (symmetric, both_directions), backward's need_* flags in
// the order of Needs, the optional label tensors, forward's need_eqs.

#include <torch/extension.h>

#include <cstdint>
#include <tuple>

#include "macl_cpu.h"

namespace {

using macl_cpu::LogitMap;
using macl_cpu::Problem;

// An output's data, or null for an undefined tensor (not needed).
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
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
  // The kernels read raw pointers (autograd is the caller's business: the custom op's
  // registered backward) and write every entry of lse_neg and eqs.
  at::Tensor lse_neg = at::empty({p.num_lse()}, anchors.options());
  at::Tensor eqs = need_eqs ? at::empty({p.num_lse()}, anchors.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(anchors.scalar_type(), "macl_cpu_forward", [&] {
    macl_cpu::forward<scalar_t>(p, anchors.data_ptr<scalar_t>(), candidates.data_ptr<scalar_t>(),
                                p.scaled() ? inv_temp->data_ptr<scalar_t>() : nullptr,
                                lse_neg.data_ptr<scalar_t>(), data_or_null<scalar_t>(eqs));
  });
  return {lse_neg, eqs};
}

// The softplus reduction's forward: (sp_neg, aux), aux the gradients' tile sums when with_grads
// (macl_cpu.h, softplus_forward), else undefined.
std::tuple<at::Tensor, at::Tensor> softplus_forward(
    const at::Tensor& anchors, const at::Tensor& candidates, const at::Tensor& inv_temp,
    const c10::optional<at::Tensor>& row_bias, const at::Tensor& pos_index,
    const c10::optional<at::Tensor>& self_index, bool with_grads) {
  const Problem p = make_problem(anchors, candidates, inv_temp, pos_index, self_index,
                                 static_cast<int64_t>(LogitMap::Scaled), 0.0, 0.0, false, false,
                                 c10::nullopt, c10::nullopt);
  check_softplus(p, anchors, row_bias);
  at::Tensor sp_neg = at::zeros({p.M}, anchors.options());
  at::Tensor aux = with_grads ? at::zeros({p.M * p.D + 2 * p.M + p.K * p.D}, anchors.options())
                              : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(anchors.scalar_type(), "macl_cpu_softplus_forward", [&] {
    macl_cpu::softplus_forward<scalar_t>(
        p, anchors.data_ptr<scalar_t>(), candidates.data_ptr<scalar_t>(),
        inv_temp.data_ptr<scalar_t>(),
        row_bias.has_value() ? row_bias->data_ptr<scalar_t>() : nullptr,
        sp_neg.data_ptr<scalar_t>(), data_or_null<scalar_t>(aux));
  });
  return {sp_neg, aux};
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
  // Symmetric: d_anchors is the whole gradient of the one tensor (both sides of every pair),
  // always computed, and there is no d_candidates. No temperature in the artanh map: no
  // d_inv_temp. The kernels accumulate into zero-filled outputs.
  at::Tensor d_anchors, d_candidates, d_inv_temp;
  if (p.symmetric || need_d_anchors) d_anchors = at::zeros({p.M, p.D}, anchors.options());
  if (!p.symmetric && need_d_candidates) d_candidates = at::zeros({p.K, p.D}, anchors.options());
  if (need_d_inv_temp && p.scaled()) d_inv_temp = at::zeros({p.num_lse()}, anchors.options());
  AT_DISPATCH_FLOATING_TYPES(anchors.scalar_type(), "macl_cpu_backward", [&] {
    macl_cpu::backward<scalar_t>(
        p, anchors.data_ptr<scalar_t>(), candidates.data_ptr<scalar_t>(),
        p.scaled() ? inv_temp->data_ptr<scalar_t>() : nullptr, lse_neg.data_ptr<scalar_t>(),
        g.data_ptr<scalar_t>(), data_or_null<scalar_t>(d_anchors),
        data_or_null<scalar_t>(d_candidates), data_or_null<scalar_t>(d_inv_temp));
  });
  return {d_anchors, d_candidates, d_inv_temp};
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
  at::Tensor d_anchors, d_candidates, d_inv_temp, d_row_bias;
  if (need_d_anchors) d_anchors = at::zeros({p.M, p.D}, anchors.options());
  if (need_d_candidates) d_candidates = at::zeros({p.K, p.D}, anchors.options());
  if (need_d_inv_temp) d_inv_temp = at::zeros({p.M}, anchors.options());
  if (need_d_row_bias && row_bias.has_value()) d_row_bias = at::zeros({p.M}, anchors.options());
  AT_DISPATCH_FLOATING_TYPES(anchors.scalar_type(), "macl_cpu_softplus_backward", [&] {
    macl_cpu::softplus_backward<scalar_t>(
        p, anchors.data_ptr<scalar_t>(), candidates.data_ptr<scalar_t>(),
        inv_temp.data_ptr<scalar_t>(),
        row_bias.has_value() ? row_bias->data_ptr<scalar_t>() : nullptr, g.data_ptr<scalar_t>(),
        data_or_null<scalar_t>(d_anchors), data_or_null<scalar_t>(d_candidates),
        data_or_null<scalar_t>(d_inv_temp), data_or_null<scalar_t>(d_row_bias));
  });
  return {d_anchors, d_candidates, d_inv_temp, d_row_bias};
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
