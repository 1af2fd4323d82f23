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
that ``ops.py`` wraps as custom operators, with what each backend can compute as data
(``Capabilities``, ``Options``, ``Reason``). It imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

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


# The kinds of a ``Reason``, and the exception a call raises for each: the environment (a
# device type, a toolchain, a compiled extension) is a RuntimeError, as ``resolve_backend``
# raised before any argument was looked at; the arguments' dtype a TypeError; their width or an
# option a ValueError (docs/design.md, "Backend selection").
DEVICE, ENVIRONMENT, BUILD, DTYPE, WIDTH, OPTION = (
    "device", "environment", "build", "dtype", "width", "option")
_ERRORS = {DEVICE: RuntimeError, ENVIRONMENT: RuntimeError, BUILD: RuntimeError,
           DTYPE: TypeError, WIDTH: ValueError, OPTION: ValueError}


class Reason(str):
    """One sentence of ``not_supported_reasons``: why a backend cannot serve a call, and what to
    do. A ``str`` (messages join them with ``"; "``) with its ``kind`` (one of ``DEVICE``,
    ``ENVIRONMENT``, ``BUILD``, ``DTYPE``, ``WIDTH``, ``OPTION``)."""

    kind: str

    def __new__(cls, text: str, kind: str):
        if kind not in _ERRORS:
            raise ValueError(f"kind must be one of {sorted(_ERRORS)}, got {kind!r}")
        self = super().__new__(cls, text)
        self.kind = kind
        return self

    @property
    def error(self) -> type:
        """The exception type a call refused for this reason raises."""
        return _ERRORS[self.kind]


def missing_build(reasons: List[Reason]) -> bool:
    """Whether the only thing keeping a backend from a call is its compiled extension (``auto``
    then warns once that it runs something slower; a backend that could not run there anyway,
    on another device type or a CPU build of torch, is passed over silently)."""
    return bool(reasons) and all(r.kind == BUILD for r in reasons)


_DEVICE_WORDS = {"cpu": "CPU", "cuda": "CUDA"}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Options:
    """What a call asks of a backend besides its device, dtype and width: the ``Problem``'s
    features (``Options.of``). ``None`` means not known (``auto`` chooses before the call's
    options exist) and is not checked."""

    logit_map: Optional[LogitMap] = None
    row_reduction: Optional[RowReduction] = None
    symmetric: Optional[bool] = None  # candidates=None: layout 2n on one process
    both_directions: Optional[bool] = None  # layout cross_sym on one process
    labels: Optional[bool] = None  # the label mask (anchor_labels / candidate_labels)
    # The inputs' half dtype before the upcast (Problem.operand_dtype): what a kernel that
    # rounds its GEMM operands reads (Triton's tile shapes depend on it).
    operand_dtype: Optional[torch.dtype] = None
    # Shared memory per block (bytes) of the GPU asked about when it is a target rather than a
    # device of this machine (the kernel inventory compiles for sm_80 / sm_90 without a GPU). A
    # backend whose limits depend on it (Triton's tile shapes) answers for that GPU, and leaves
    # out what this process's environment says (a visible device, the interpreter). None: the
    # call's own device, the environment checked (auto, an explicit backend, info).
    shared_limit: Optional[int] = None

    @classmethod
    def of(cls, problem: "Problem") -> "Options":
        return cls(problem.logit_map, problem.row_reduction, problem.symmetric,
                   problem.both_directions, problem.has_labels, problem.operand_dtype)


@dataclass(frozen=True)
class Capabilities:
    """What a kernel backend computes, as data: the one declaration ``not_supported_reasons``
    reads (``auto``, the explicit-backend error, ``Backend.check``, ``macl-kernels info``).

    ``dtypes`` are compute dtypes: the anchors' dtype when they reach the kernels (the losses
    upcast float16 / bfloat16 inputs to float32 and pass the half dtype as ``operand_dtype``).
    """

    devices: Tuple[str, ...]  # device types the kernels run on; () = wherever torch runs
    dtypes: Tuple[torch.dtype, ...]  # compute dtypes; () = any dtype the matmul supports
    max_d: Optional[int] = None  # widest embedding (None: no cap)
    logit_maps: Tuple[LogitMap, ...] = tuple(LogitMap)
    row_reductions: Tuple[RowReduction, ...] = tuple(RowReduction)
    symmetric: bool = True  # layout 2n on one process (candidates=None)
    both_directions: bool = True  # Problem.both_directions: one S for both directions
    labels: bool = True  # the label mask of Neg(a)
    half_operands: bool = False  # rounds its GEMM operands to float16 / bfloat16 operand_dtype
    # "python" (nothing to compile), "aot" (a compiled extension built ahead of time by
    # setup.py), "aot+jit" (that, or built on first use from the packaged sources)
    build: str = "python"

    def device_text(self) -> str:
        return ", ".join(self.devices) if self.devices else "any"

    def summary(self) -> str:
        """One line for ``macl-kernels info``."""
        dtypes = "/".join(_dtype_name(d) for d in self.dtypes) if self.dtypes else "any"
        parts = [f"devices {self.device_text()}", f"dtypes {dtypes}",
                 f"D <= {self.max_d}" if self.max_d is not None else "any D"]
        features = [name for name, ok in (("layout 2n", self.symmetric),
                                          ("both directions", self.both_directions),
                                          ("labels", self.labels),
                                          ("half operands", self.half_operands)) if ok]
        features += [m.name.lower() for m in self.logit_maps]
        features += [r.name.lower() for r in self.row_reductions]
        return "; ".join(parts) + "; " + ", ".join(features)


class Backend:
    """What a kernel backend implements (``backends/<name>.py`` exposes one instance as
    ``BACKEND``). ``ops`` turns it into the two custom operators; nothing else calls ``fwd`` /
    ``bwd``.

    Subclasses set ``name`` and ``capabilities`` (data). Where the environment decides
    (a toolchain, a compiled extension, a device), they override ``environment_reason``; where
    a reason depends on more than the data (Triton's tile shapes per GPU), they extend
    ``not_supported_reasons`` (calling it on ``super()`` first)."""

    name: str = ""
    capabilities: Capabilities = Capabilities(devices=(), dtypes=())
    # A native backend's compiled extension (``backends/_native.Extension``: its build state
    # for ``info``, and the first-use build when selection chooses it); None: nothing compiled.
    extension = None

    def environment_reason(self, device: Optional[torch.device]) -> Optional[Reason]:
        """Why this environment cannot run the backend on ``device`` (``None``: here at all),
        given that the device type is one of ``capabilities.devices``; ``None`` when it can.
        A ``BUILD`` reason when only a compiled extension is missing."""
        return None

    def not_supported_reasons(self, device: Optional[torch.device] = None,
                              dtype: Optional[torch.dtype] = None, D: Optional[int] = None,
                              options: Optional[Options] = None) -> List[Reason]:
        """Every reason this backend cannot serve a call on ``device`` with compute dtype
        ``dtype``, width ``D`` and ``options``; ``[]`` when it can. ``None`` arguments are not
        known and not checked. The one answer to "can this backend serve this problem"."""
        caps = self.capabilities
        reasons: List[Reason] = []
        if device is not None and caps.devices and device.type not in caps.devices:
            words = " or ".join(_DEVICE_WORDS.get(d, d) for d in caps.devices)
            reasons.append(Reason(f"the {self.name} backend runs on {words} tensors only "
                                  f"(got {device})", DEVICE))
        else:
            env = self.environment_reason(device)
            if env is not None:
                reasons.append(env)
        if dtype is not None and caps.dtypes and dtype not in caps.dtypes:
            reasons.append(Reason(
                f"the {self.name} backend computes in "
                f"{' or '.join(_dtype_name(d) for d in caps.dtypes)}, got {dtype} (half inputs "
                f"reach it upcast to float32 by the loss functions)", DTYPE))
        if D is not None and caps.max_d is not None and D > caps.max_d:
            reasons.append(Reason(
                f"backend {self.name!r} supports embeddings of width D <= {caps.max_d}, got "
                f"D = {D}; use backend='torch' (or 'auto') for wider embeddings", WIDTH))
        if options is not None:
            reasons.extend(self._option_reasons(options))
        return reasons

    def _option_reasons(self, o: Options) -> List[Reason]:
        caps, out = self.capabilities, []
        wanted = [(o.logit_map is not None and o.logit_map not in caps.logit_maps,
                   f"LogitMap.{o.logit_map.name if o.logit_map is not None else ''}"),
                  (o.row_reduction is not None and o.row_reduction not in caps.row_reductions,
                   f"RowReduction.{o.row_reduction.name if o.row_reduction is not None else ''}"),
                  (bool(o.symmetric) and not caps.symmetric, "a symmetric S (candidates=None)"),
                  (bool(o.both_directions) and not caps.both_directions, "both_directions"),
                  (bool(o.labels) and not caps.labels, "the label mask")]
        for refused, what in wanted:
            if refused:
                out.append(Reason(f"the {self.name} backend does not implement {what}; use "
                                  f"backend='torch' (or 'auto')", OPTION))
        return out

    def check(self, problem: Problem) -> None:
        """Refuse what the backend cannot do before ``fwd``: ``not_supported_reasons`` of the
        problem, raised as the first reason's exception type (``TypeError`` for a dtype,
        ``ValueError`` for a width or an option, ``RuntimeError`` for the environment)."""
        reasons = self.not_supported_reasons(problem.anchors.device, problem.anchors.dtype,
                                             problem.D, Options.of(problem))
        if reasons:
            raise reasons[0].error("; ".join(reasons))

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
