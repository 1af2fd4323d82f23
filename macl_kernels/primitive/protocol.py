"""The one primitive every loss is built from, and the protocol a backend implements.

Math (``docs/math.md``, section "The primitive"; names as in the glossary of ``docs/design.md``):
for anchor rows ``anchors [M, D]`` and candidate rows ``candidates [K, D]``,

    S_ak       = anchors[a] . candidates[k]
    l_ak       = inv_temp[a] * S_ak                                    LogitMap.SCALED
               = artanh_scale * artanh(clamp(S_ak, -1 + artanh_eps, 1 - artanh_eps))
                                                                       LogitMap.ARTANH
    Neg(a)     = every candidate but pos_index[a] and self_index[a]
                 (pos_index[a] = -1: no positive among the candidates, nothing excluded but self;
                  a memory bank, docs/math.md#memory-bank-moco)
                 and, with labels, every k with candidate_labels[k] == anchor_labels[a]
                 (docs/math.md#label-masked-negatives)
    lse_neg[a] = log sum_{k in Neg(a)} exp(l_ak)          (-inf when Neg(a) is empty)
    eqs[a]     = sum_{k in Neg(a)} Q_ak S_ak = d lse_neg[a] / d inv_temp[a]
                                                          (on request, SCALED only; 0 when empty)

and its backward for an upstream gradient ``g = dL/d lse_neg``:

    Q_ak       = exp(l_ak - lse_neg[a])  on Neg(a), 0 elsewhere
    dL_dl      = g_a Q_ak
    dL_dS      = dL_dl * dl_dS,   dl_dS = inv_temp[a]  (SCALED)
                                        = artanh_scale / (1 - S_ak^2) inside the clamp, 0 outside
    d_anchors    = dL_dS @ candidates
    d_candidates = dL_dS^T @ anchors
    d_inv_temp_a = sum_k dL_dl_ak S_ak                    (SCALED only)

``RowReduction.SOFTPLUS`` (SigLIP, ``docs/math.md#siglip``) replaces the log-sum-exp by a sum of
softplus, with a per-row additive bias ``row_bias [M]`` (SCALED map only, candidates distinct
from the anchors):

    l_ak       = inv_temp[a] * S_ak + row_bias[a]
    sp_neg[a]  = sum_{k in Neg(a)} softplus(l_ak)                   (0 when Neg(a) is empty)
    dL_dl      = g_a sigmoid(l_ak)  on Neg(a), 0 elsewhere           (no forward statistic)
    d_row_bias_a = sum_k dL_dl_ak,  and the other gradients as above

``both_directions`` (layout ``cross_sym`` on one process): the rows of ``S`` are anchors against
the candidates and its columns are anchors against the rows, from the same tiles. Then
``inv_temp``, ``pos_index``, ``self_index`` and ``lse_neg`` have ``M + K`` entries: the first
``M`` for the rows (indices into ``candidates``), the last ``K`` for the columns (indices into
``anchors``), and ``l_{k,a} = inv_temp[M + k] S_ak`` for column ``k``.

This module holds no math of its own: it names the arguments (``Problem``), the logit map
(``LogitMap``), what a backward must produce (``Needs``, ``Grads``) and the ``Backend`` protocol
that ``macl_kernels/_ops.py`` wraps as custom operators. It imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor


class LogitMap(enum.IntEnum):
    """How a similarity ``S_ak`` becomes a logit ``l_ak``. The integer values are the ones the
    kernels use: Triton's ``LOGIT_MAP`` constexpr, C++'s ``LogitMap``, CUDA's
    ``MACL_LOGIT_MAP_*``. Any other value is refused by every backend."""

    SCALED = 0  # l_ak = inv_temp[a] * S_ak
    ARTANH = 1  # l_ak = artanh_scale * artanh(clamp(S_ak, -1 + artanh_eps, 1 - artanh_eps))


class RowReduction(enum.IntEnum):
    """What the primitive reduces each anchor row's negatives to. The integer values are the
    kernels': Triton's ``ROW_REDUCTION`` constexpr, C++'s ``RowReduction``, CUDA's
    ``MACL_ROW_REDUCTION_*``. Any other value is refused by every backend."""

    LSE = 0  # lse_neg[a] = log sum_{k in Neg(a)} exp(l_ak)
    SOFTPLUS = 1  # sp_neg[a] = sum_{k in Neg(a)} softplus(l_ak), l_ak = inv_temp[a] S_ak + row_bias[a]


@dataclass(frozen=True)
class Problem:
    """One call of the primitive: the tensors and the scalars, passed down once from ``_ops``
    to a backend's ``fwd`` / ``bwd`` / ``fake_aux``.

    ``candidates is None`` means the candidates are the anchors (layout ``2n`` on one process):
    ``S`` is symmetric and a kernel may compute each off-diagonal tile once for both of its
    rows. The tensors arrive contiguous; ``pos_index`` / ``self_index`` are int64 ``[M]``.
    """

    anchors: Tensor  # [M, D], float32 or float64 (the compute dtype)
    candidates: Optional[Tensor]  # [K, D] of the anchors' dtype and device; None: the anchors
    inv_temp: Optional[Tensor]  # [M], LogitMap.SCALED only (None for ARTANH)
    pos_index: Tensor  # [M] int64: row a's positive among the candidates, or -1 for none
    self_index: Optional[Tensor]  # [M] int64: row a itself among the candidates, or None
    logit_map: LogitMap
    artanh_scale: float = 0.0  # LogitMap.ARTANH's c (> 0); unused by SCALED
    artanh_eps: float = 0.0  # LogitMap.ARTANH's clamp e in (0, 1); unused by SCALED
    # The inputs' dtype before the upcast to the compute dtype: a kernel may round its GEMM
    # operands to it (float16 / bfloat16 tensor cores); statistics stay in the compute dtype.
    operand_dtype: Optional[torch.dtype] = None
    # What each row's negatives reduce to; SOFTPLUS (SigLIP) takes the SCALED map, distinct
    # candidates and an optional additive bias row_bias [M] (compute dtype; None: no bias).
    row_reduction: RowReduction = RowReduction.LSE
    row_bias: Optional[Tensor] = None
    # Label mask: int64 [M] / [K]; a candidate of the anchor's label is not in Neg(a). Both
    # or neither; symmetric problems take candidate_labels = None (the anchors' labels serve).
    anchor_labels: Optional[Tensor] = None
    candidate_labels: Optional[Tensor] = None
    # Both directions of one S (layout cross_sym, one process): the per-anchor tensors and
    # lse_neg have M + K entries, rows first, then columns (see the module docstring). LSE
    # reduction without labels only (_ops refuses the rest).
    both_directions: bool = False

    @property
    def softplus(self) -> bool:
        return self.row_reduction is RowReduction.SOFTPLUS

    @property
    def has_labels(self) -> bool:
        return self.anchor_labels is not None

    @property
    def candidate_label_rows(self) -> Optional[Tensor]:
        """The candidates' labels (the anchors' when ``symmetric``), or ``None``."""
        return self.anchor_labels if self.candidate_labels is None else self.candidate_labels

    @property
    def symmetric(self) -> bool:
        return self.candidates is None

    @property
    def num_lse(self) -> int:
        """Entries of ``lse_neg`` (and of ``inv_temp``, ``pos_index``, ``self_index``):
        ``M``, or ``M + K`` with ``both_directions``."""
        return self.M + self.K if self.both_directions else self.M

    def direction(self, columns: bool) -> "Problem":
        """One direction of a ``both_directions`` problem as a plain cross problem: the rows
        (``columns=False``: anchors against candidates) or the columns (candidates against
        anchors)."""
        rows = slice(self.M, None) if columns else slice(0, self.M)

        def part(t):
            return None if t is None else t[rows]

        anchors, candidates = ((self.candidates, self.anchors) if columns
                               else (self.anchors, self.candidates))
        return Problem(anchors, candidates, part(self.inv_temp), part(self.pos_index),
                       part(self.self_index), self.logit_map, self.artanh_scale, self.artanh_eps,
                       self.operand_dtype)

    @property
    def candidate_rows(self) -> Tensor:
        """The candidates as a tensor (the anchors themselves when ``symmetric``)."""
        return self.anchors if self.candidates is None else self.candidates

    @property
    def M(self) -> int:
        return self.anchors.shape[0]

    @property
    def K(self) -> int:
        return self.candidate_rows.shape[0]

    @property
    def D(self) -> int:
        return self.anchors.shape[1]


class Needs(NamedTuple):
    """Which gradients a backward must produce. For a ``symmetric`` problem ``_ops`` asks for
    both ``d_anchors`` and ``d_candidates`` whenever the one tensor needs a gradient."""

    d_anchors: bool
    d_candidates: bool
    d_inv_temp: bool
    d_row_bias: bool = False  # RowReduction.SOFTPLUS with a row_bias only


class Grads(NamedTuple):
    """A backward's result; ``None`` where not needed.

    Symmetric problems: the one tensor's gradient is ``d_anchors + d_candidates``. A kernel that
    exploits the symmetry inside (the cpu and triton backends) returns that sum as
    ``d_anchors`` and ``d_candidates=None``; ``_ops`` adds the two when both are given. That
    fold happens in ``_ops`` only.

    ``both_directions``: ``d_anchors`` and ``d_candidates`` hold both directions' contributions
    and ``d_inv_temp`` has ``M + K`` entries."""

    d_anchors: Optional[Tensor]
    d_candidates: Optional[Tensor]
    d_inv_temp: Optional[Tensor]
    d_row_bias: Optional[Tensor] = None


class Backend:
    """What a kernel backend implements (``backends/<name>.py`` exposes one instance as
    ``BACKEND``). ``_ops`` turns it into the two custom operators; nothing else calls it.

    Subclasses set ``name`` and, when their kernels cap the embedding width, ``max_d`` (``auto``
    passes over the backend beyond it; an explicit request gets a ``ValueError``)."""

    name: str = ""
    max_d: Optional[int] = None
    # Whether the backend is compiled code that the package builds (``auto`` warns once when
    # it passes over such a backend because it was not built).
    native: bool = False
    # Whether fwd/bwd handle Problem.both_directions themselves (one S for both directions);
    # otherwise _ops runs the two directions as two plain problems.
    both_directions: bool = False

    def unavailable_reason(self, device: Optional[torch.device]) -> Optional[str]:
        """``None`` when usable on ``device`` (or here at all, for ``None``), else a sentence
        saying why not and what to do."""
        raise NotImplementedError

    def built(self) -> bool:
        """Native backends: whether their compiled extension imports."""
        return True

    def missing_build(self, device: Optional[torch.device]) -> bool:
        """Whether the only thing keeping this backend from ``device`` is its extension not being
        built (``auto`` then warns once that it runs something slower). ``False`` when the
        backend could not run there anyway (another device type, a CPU build of torch, ...)."""
        return False

    def width_reason(self, dim: Optional[int], dtype: Optional[torch.dtype],
                     device: Optional[torch.device]) -> Optional[str]:
        """Why ``auto`` passes over this backend for embeddings of width ``dim`` and dtype
        ``dtype`` on ``device`` (``None``: it serves them; ``None`` arguments are unknown)."""
        if dim is not None and self.max_d is not None and dim > self.max_d:
            return f"supports D <= {self.max_d}, got D = {dim}"
        return None

    def check(self, problem: Problem) -> None:
        """Refuse what the kernels cannot do (dtype, width), with a ``TypeError`` /
        ``ValueError`` naming it. Called by ``_ops`` before ``fwd``."""
        if self.max_d is not None and problem.D > self.max_d:
            raise ValueError(
                f"backend {self.name!r} supports embeddings of width D <= {self.max_d}, got "
                f"D = {problem.D}; use backend='torch' (or 'auto') for wider embeddings")

    def fwd(self, problem: Problem, need_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """``(lse_neg [M], aux)``: ``aux`` is whatever the backward needs besides ``lse_neg``
        (e.g. Triton's anchor-side accumulator ``E``), or ``None``."""
        raise NotImplementedError

    def fwd_eqs(self, problem: Problem,
                need_grad: bool) -> Tuple[Tensor, Optional[Tensor], Tensor]:
        """``(lse_neg, aux, eqs)`` with ``eqs[a] = sum_{k in Neg(a)} Q_ak S_ak`` (``LogitMap.SCALED``
        only). This default runs the backward once more with a unit upstream gradient and keeps
        only ``d_inv_temp`` (which is ``eqs``): correct everywhere, one extra pass over the tiles.
        Backends that carry the extra accumulator in their forward override it."""
        lse_neg, aux = self.fwd(problem, need_grad)
        shifted = torch.where(lse_neg == float("-inf"), torch.zeros_like(lse_neg), lse_neg)
        eqs = self.bwd(problem, shifted, aux, torch.ones_like(lse_neg),
                       Needs(False, False, True)).d_inv_temp
        return lse_neg, aux, eqs.to(lse_neg.dtype)

    def bwd(self, problem: Problem, lse_neg: Tensor, aux: Optional[Tensor], g: Tensor,
            needs: Needs) -> Grads:
        """The gradients of ``sum_a g[a] * lse_neg[a]`` (``g`` contiguous, of ``lse_neg``'s
        dtype)."""
        raise NotImplementedError

    def fake_aux(self, problem: Problem, need_grad: bool) -> Optional[Tensor]:
        """``aux``'s shape and dtype (an empty-like tensor) for ``torch.compile``'s fake
        tensors; ``None`` when ``fwd`` returns no ``aux``."""
        return None


def autocast_off(device_type: str):
    """A context with autocast disabled on ``device_type`` (``cpu`` and ``cuda``: the device types
    autocast knows; any other runs as it is)."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
