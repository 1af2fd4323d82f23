"""The set-up every loss family shares: validation of the common arguments, the layouts'
anchor/candidate blocks (plus extra negatives and labels), the positive similarities, the call of
the primitive, the distributed reference path, the reduction, the autocast guard, and the drop-ins'
peer semantics.

The public losses (``functional.py``, ``supervised.py``, ``sogclr.py``) are short formulas on the
per-row vectors this module produces (docs/math.md#assembling-a-loss). Nothing here is public:
the package's surface is the losses themselves, one function per loss.

**Peer semantics.** A drop-in module (``modules.py``) must reproduce its peer's edge behaviour
where the public function is strict (docs/math.md#drop-in-edge-behaviour): lightly's losses accept
a negative temperature and a batch whose anchors have no negative, OpenCLIP's ``ClipLoss`` any
finite scale and its two gradient semantics of the gather. The public functions keep their
signatures (no extra argument): a module wraps its one call in ``with peer_semantics(...)``, and
the loss reads ``peer()``. The options live in a ``threading.local`` (one per thread: a call in
another thread never sees them), which ``torch.compile`` traces and guards (no graph break).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import torch

from . import _math
from . import _validate as V
from . import distributed
from ._math import compute_dtype
from . import primitive
from .primitive import LogitMap, resolve_backend

# How a distributed loss gathers every rank's rows (``PeerSemantics.gather_kind``).
GATHER_KINDS = ("with_grad", "local_grad", "no_grad")


class PeerSemantics:
    """The edge behaviour of a drop-in's peer, for one call of a public loss.

    ``lenient``: any non-zero temperature (and, for ``clip_loss``, any finite scale), and anchors
    without a negative give the peer's value instead of a ``ValueError``. ``gather_kind``
    (``clip_loss``): ``"with_grad"`` (the public semantics), ``"local_grad"`` (OpenCLIP's
    ``gather_with_grad=False``: the local slice attached) or ``"no_grad"`` (every gathered row
    detached: ``local_loss=True, gather_with_grad=False``). ``stats``: written by ``macl_loss``
    inside a ``peer_semantics`` block, its ``(tau, alignment)`` (detached), for ``MACLLoss``."""

    __slots__ = ("lenient", "gather_kind", "stats")

    def __init__(self, lenient: bool = False, gather_kind: str = "with_grad"):
        V.check_choice("gather_kind", gather_kind, GATHER_KINDS)
        self.lenient = lenient
        self.gather_kind = gather_kind
        self.stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


_PUBLIC = PeerSemantics()  # the public functions' own semantics (never written: see record)
_local = threading.local()


def peer() -> PeerSemantics:
    """The semantics of the current call: a drop-in's inside ``peer_semantics``, else public."""
    return getattr(_local, "semantics", _PUBLIC)


@contextlib.contextmanager
def peer_semantics(lenient: bool = False, gather_kind: str = "with_grad"
                   ) -> Iterator[PeerSemantics]:
    """Run the enclosed public-loss call with a drop-in's peer semantics (this thread only)."""
    previous = peer()
    _local.semantics = semantics = PeerSemantics(lenient, gather_kind)
    try:
        yield semantics
    finally:
        _local.semantics = previous


def record_stats(tau: torch.Tensor, alignment: torch.Tensor) -> None:
    """Hand ``(tau, alignment)`` to the drop-in that asked (none outside ``peer_semantics``)."""
    semantics = peer()
    if semantics is not _PUBLIC:
        semantics.stats = (tau, alignment)


def check_temperature(value, any_sign: bool) -> float:
    """``> 0``; the drop-ins whose peer computes with a negative temperature pass ``any_sign``
    (then only zero is refused: it divides)."""
    if not any_sign:
        return V.check_positive("temperature", value)
    value = V.check_real("temperature", value)
    if value == 0:
        raise ValueError("temperature must be non-zero, got 0.0")
    return value


class Block(NamedTuple):
    """Anchors against candidates; row ``a``'s positive is ``candidates[pos_index[a]]`` and,
    when ``self_index`` is given, ``candidates[self_index[a]]`` is the anchor itself (skipped)."""

    anchors: torch.Tensor
    candidates: torch.Tensor
    pos_index: torch.Tensor
    self_index: Optional[torch.Tensor]
    # False-negative masking: the anchors' and candidates' labels (docs/math.md#label-masked-negatives)
    anchor_labels: Optional[torch.Tensor] = None
    candidate_labels: Optional[torch.Tensor] = None
    # The positives' rows, candidates[pos_index], built from views and slices rather than by a
    # gather (an index copy and an index_put in backward); None: gather them.
    pos_rows: Optional[torch.Tensor] = None
    # Layout 2n on one process: the anchors are [u1; u2] and their positives [u2; u1], so the
    # positive similarities are u1 . u2 twice; (u1, u2) here computes them once.
    pos_halves: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    # The choices a backend may exploit, made here where the blocks are built (never guessed
    # later from tensor identity):
    # - symmetric: the candidates are the anchors themselves (layout 2n on one process, no extra
    #   negatives): S is symmetric and the primitive gets the rows once;
    # - transposed_next (the row block of cross_sym on one process): the next block is this one
    #   transposed on the layout's own candidates (u2 against u1), so its positive similarities
    #   are this block's;
    # - both_directions (the same, with no extra negatives and no labels): one primitive call in
    #   both directions serves this block and the next, each tile of S for rows and columns.
    symmetric: bool = False
    transposed_next: bool = False
    both_directions: bool = False


def with_labels(blocks, labels, layout: str, prep_dist=None):
    """Attach the rows' labels to the blocks of ``layout`` (gathered like the candidates). A label
    mask is per direction: CLIP's two directions become two calls (``both_directions`` off)."""
    if labels is None:
        return blocks
    y = labels.to(torch.int64)
    y_all = y if prep_dist is None else distributed.gather_no_grad(y, prep_dist)
    if layout == "2n":
        (b,) = blocks
        return [b._replace(anchor_labels=torch.cat([y, y]),
                           candidate_labels=torch.cat([y_all, y_all]))]
    return [b._replace(anchor_labels=y, candidate_labels=y_all, both_directions=False)
            for b in blocks]


def layout_blocks(u1: torch.Tensor, u2: torch.Tensor, layout: str, prep_dist=None,
                  gather=None, negatives: Optional[torch.Tensor] = None):
    """The anchor/candidate blocks of ``layout``. Distributed: the anchors are the local rows,
    the candidates every rank's rows (``gather``), positives and self offset by ``rank * n``.

    ``negatives`` (extra candidate rows, already in the compute dtype and gathered) are appended
    after the layout's own candidates, so no index moves: every anchor of ``2n`` and ``cross``
    sees them, in ``cross_sym`` only the row direction (the ``u1`` anchors) does."""
    n = u1.shape[0]
    if prep_dist is None:
        offset, total, u1_all, u2_all = 0, n, u1, u2
    else:
        offset, total = prep_dist.rank * n, prep_dist.world_size * n
        u1_all, u2_all = gather(u1), gather(u2)
    rows = torch.arange(n, device=u1.device) + offset

    def with_negatives(candidates):
        return candidates if negatives is None else torch.cat([candidates, negatives])

    def local(rows_all):  # this rank's rows of a gathered tensor: the positives of its anchors
        return rows_all if prep_dist is None else rows_all.narrow(0, offset, n)

    if layout == "2n":
        # Local anchors [u1; u2] against all candidates [u1_all; u2_all]. Single process: one
        # tensor for both, S = U U^T is symmetric and a backend may exploit that.
        U = torch.cat([u1, u2])
        U_all = U if prep_dist is None else torch.cat([u1_all, u2_all])
        if prep_dist is None:
            return [Block(U, with_negatives(U), torch.cat([rows + total, rows]),
                          torch.cat([rows, rows + total]), pos_halves=(u1, u2),
                          symmetric=negatives is None)]
        return [Block(U, with_negatives(U_all), torch.cat([rows + total, rows]),
                      torch.cat([rows, rows + total]),
                      pos_rows=torch.cat([local(u2_all), local(u1_all)]))]
    if layout == "cross":
        return [Block(u1, with_negatives(u2_all), rows, None, pos_rows=local(u2_all))]
    # cross_sym. One process: the column block is the row block transposed. Distributed, the
    # candidates are every rank's rows, not the other block's anchors: two separate blocks.
    one_process = prep_dist is None
    return [Block(u1, with_negatives(u2_all), rows, None, pos_rows=local(u2_all),
                  transposed_next=one_process,
                  both_directions=one_process and negatives is None),
            Block(u2, u1_all, rows, None, pos_rows=local(u1_all))]


def negatives_per_anchor(layout: str, total_rows: int, extra: int) -> int:
    """The fewest negatives any anchor of ``layout`` has (shapes only: no data, no sync)."""
    if layout == "2n":
        return 2 * total_rows - 2 + extra
    if layout == "cross":
        return total_rows - 1 + extra
    return total_rows - 1  # cross_sym: the column direction sees no extra negatives


def local_anchor_rows(layout: str, n: int, ctx) -> torch.Tensor:
    """Where this rank's anchors sit among the global batch's anchors (in ``"none"`` order)."""
    rows = torch.arange(n) + ctx.rank * n
    if layout == "cross":
        return rows
    return torch.cat([rows, rows + ctx.world_size * n])


def row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(x * y).sum(1)`` (``linalg.vecdot``: fastest of the forms measured on the CPU; a batched
    ``bmm`` was 3-4x slower); its ``[M, D]`` temporary lives only inside the forward call."""
    return torch.linalg.vecdot(x, y, dim=1)


def positive_similarity(blocks) -> torch.Tensor:
    """``S_a,p(a)`` of every block's anchors. The pairs that occur twice on one process are
    computed once: layout 2n's ``u1 . u2`` (anchors ``a`` and ``a + N``) and, for two blocks that
    are each other's transpose (cross_sym, ``transposed_next``), the second block's ``u2 . u1``."""
    if blocks[0].transposed_next:
        s = row_dot(blocks[0].anchors, blocks[0].pos_rows)
        return torch.cat([s, s])
    parts = []
    for b in blocks:
        if b.pos_halves is not None:
            s = row_dot(*b.pos_halves)
            parts += [s, s]
        else:
            parts.append(row_dot(b.anchors, b.candidates[b.pos_index] if b.pos_rows is None
                                  else b.pos_rows))
    return torch.cat(parts)


def negative_lse(prep, inv_temp: Optional[torch.Tensor],
                 logit_map: LogitMap = LogitMap.SCALED, artanh_scale: float = 0.0,
                 artanh_eps: float = 0.0):
    """``lse_neg`` of every block's anchor rows by the backend's primitive, through the custom
    op (opaque to ``torch.compile``). ``operand_dtype`` (the inputs' dtype) tells a
    kernel which precision its GEMM operands may be rounded to (the tensor cores for half inputs);
    statistics and gradients stay in the compute dtype. A ``symmetric`` block passes its rows
    once. A block marked ``both_directions`` (layout cross_sym on one process, set by
    ``layout_blocks``) and the next one are one call in both directions: each tile of ``S``
    serves the rows and the columns. Every other block is a call of its own."""
    blocks = prep.blocks
    if blocks[0].both_directions:
        rows, cols = blocks
        self_index = (None if rows.self_index is None and cols.self_index is None
                      else torch.cat([rows.self_index, cols.self_index]))
        return primitive.negative_lse(prep.name, rows.anchors, rows.candidates, inv_temp,
                                      torch.cat([rows.pos_index, cols.pos_index]), self_index,
                                      logit_map, artanh_scale, artanh_eps, prep.out_dtype,
                                      both_directions=True)
    out, r0 = [], 0
    for b in blocks:
        m = b.anchors.shape[0]
        inv_temp_rows = inv_temp[r0:r0 + m] if inv_temp is not None else None
        candidates = None if b.symmetric else b.candidates
        out.append(primitive.negative_lse(
            prep.name, b.anchors, candidates, inv_temp_rows, b.pos_index, b.self_index,
            logit_map, artanh_scale, artanh_eps, prep.out_dtype, anchor_labels=b.anchor_labels,
            candidate_labels=None if candidates is None else b.candidate_labels))
        r0 += m
    return torch.cat(out)


class Prepared(NamedTuple):
    u1: Optional[torch.Tensor]  # local rows, normalised (None for the reference backend)
    u2: Optional[torch.Tensor]
    blocks: Optional[list]
    name: str  # the resolved backend's name
    out_dtype: torch.dtype
    dist: Optional[distributed.DistContext]  # None: the local loss
    gather: Optional[Callable]  # rows of every rank, with the gradient semantics asked for
    negatives: Optional[torch.Tensor] = None  # extra candidates as given (reference backend)

    @property
    def is_reference(self) -> bool:
        return self.name == "reference"


GATHERS = {"with_grad": distributed.gather_with_grad,
           "local_grad": distributed.gather_local_grad,
           "no_grad": distributed.gather_no_grad}


def prepare(z1, z2, layout, normalize, reduction, gather_distributed, backend, validate,
            names=("z1", "z2"), gather_kind="with_grad", negatives=None, allow_empty=False,
            labels=None):
    """Shared validation and set-up of every loss. ``validate`` (True, False or "full", see
    ``_validate.py``): only ``"full"`` reads tensor data. ``allow_empty``: the drop-ins' peers
    accept a batch whose anchors have no negative (``lse_neg = -inf``, the peers' value)."""
    mode = V.check_validate(validate)
    V.check_embedding_pair(names[0], z1, names[1], z2, validate=mode)
    V.check_choice("layout", layout, V.LAYOUTS)
    V.check_choice("reduction", reduction, V.REDUCTIONS)
    V.check_bool("normalize", normalize)
    V.check_bool("gather_distributed", gather_distributed)
    V.check_backend(backend)
    negatives = V.check_negatives("negatives", negatives, z1, mode)
    if labels is not None:
        labels = V.check_labels("labels", labels, z1.shape[0], z1, mode)
        if negatives is not None:
            raise ValueError("labels cannot be combined with negatives (the extra candidates "
                             "carry no labels)")
    name = resolve_backend(backend, z1.device, z1.shape[1], z1.dtype)
    ctx = distributed.context(gather_distributed)
    if mode != "none" and not allow_empty:
        extra = 0 if negatives is None else negatives.shape[0]
        V.check_has_negatives(
            negatives_per_anchor(layout, z1.shape[0] * (1 if ctx is None else ctx.world_size),
                                 extra * (1 if ctx is None else ctx.world_size)),
            f"a batch of {z1.shape[0]} row(s)" + ("" if ctx is None else
                                                  f" on each of {ctx.world_size} ranks")
            + f" in layout {layout!r}" + ("" if negatives is None else
                                          f" with {negatives.shape[0]} extra negatives"))
    gather = None
    if ctx is not None:
        distributed.check_equal_rows(z1.shape[0], z1.device, ctx)
        if negatives is not None:
            distributed.check_equal_rows(negatives.shape[0], z1.device, ctx, what="negatives")
        gather = functools.partial(GATHERS[gather_kind], ctx=ctx)
    if name == "reference":
        return Prepared(None, None, None, name, z1.dtype, ctx, gather, negatives)
    u1, u2 = (_math.normalize(z, normalize) for z in (z1, z2))
    neg = None
    if negatives is not None:
        neg = _math.normalize(negatives.to(u1.dtype), normalize)
        if ctx is not None:
            neg = gather(neg)
    blocks = with_labels(layout_blocks(u1, u2, layout, ctx, gather, neg), labels, layout, ctx)
    return Prepared(u1, u2, blocks, name, z1.dtype, ctx, gather)


def reference_loss(prep: Prepared, fn: Callable, z1, z2, layout: str, reduction: str,
                   **kwargs):
    """The full-matrix oracle. Distributed, it computes the global batch's per-anchor losses from
    the gathered inputs and keeps this rank's anchors: the same semantics as the kernels' path
    (local anchors, gathered candidates) at the oracle's ``O(M * K)`` cost."""
    if prep.negatives is not None:
        kwargs["negatives"] = prep.negatives
    if kwargs.get("labels") is None:
        kwargs.pop("labels", None)
    elif prep.dist is not None:
        kwargs["labels"] = distributed.gather_no_grad(kwargs["labels"].to(torch.int64), prep.dist)
    if prep.dist is None:
        return fn(z1, z2, layout=layout, reduction=reduction, **kwargs)
    wide = compute_dtype(z1.dtype)  # the reference computes in this dtype anyway
    z1_all, z2_all = (prep.gather(z.to(wide)) for z in (z1, z2))
    if prep.negatives is not None:
        kwargs["negatives"] = prep.gather(prep.negatives.to(wide))
    if kwargs.get("weights") is not None:  # one per local anchor row, in local "none" order
        halves = kwargs["weights"].to(wide).chunk(1 if layout == "cross" else 2)
        kwargs["weights"] = torch.cat([prep.gather(h) for h in halves])
    per_anchor = fn(z1_all, z2_all, layout=layout, reduction="none", **kwargs)
    stats = None
    if isinstance(per_anchor, tuple):  # MACL's (loss, tau, alignment)
        per_anchor, tau, alignment = per_anchor
        rows = local_anchor_rows(layout, z1.shape[0], prep.dist).to(per_anchor.device)
        stats = (tau[rows] if tau.dim() == 1 else tau, alignment[rows] if alignment.dim() == 1
                 else alignment)
    rows = local_anchor_rows(layout, z1.shape[0], prep.dist).to(per_anchor.device)
    out = _math.reduce(per_anchor.to(wide)[rows], reduction, z1.dtype)
    return (out, *stats) if stats is not None else out


def constant_rows(value: float, m: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((m,), value, dtype=like.dtype, device=like.device)


def finish(per_anchor: torch.Tensor, reduction: str, out_dtype: torch.dtype) -> torch.Tensor:
    return _math.reduce(per_anchor, reduction, out_dtype)


def outside_autocast(fn: Callable) -> Callable:
    """Run a loss with autocast off. Under ``torch.autocast`` the embeddings arrive in half
    precision; the loss upcasts them itself (float32 logits, LSE and accumulators,
    docs/math.md#numerical-hazards) and returns the loss and gradients in the inputs' dtype. Left on, autocast would silently
    round the similarity GEMMs of the reference and torch backends to half precision."""

    @functools.wraps(fn)
    def wrapper(z1, *args, **kwargs):
        device_type = z1.device.type if isinstance(z1, torch.Tensor) else "cpu"
        if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return fn(z1, *args, **kwargs)
        return fn(z1, *args, **kwargs)

    return wrapper


def scalar_rows(value, m: int, like: torch.Tensor) -> torch.Tensor:
    """A float or a 0-d tensor as ``m`` rows of ``like``'s dtype and device (a tensor keeps its
    autograd graph: the rows' gradients sum back into it)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype).expand(m)
    return constant_rows(value, m, like)


def zero_if_no_negative(per_anchor, lse_neg, labels):
    """With labels, an anchor whose every candidate shares its label has ``lse_neg = -inf``: its
    loss is 0 with no gradient (docs/math.md#label-masked-negatives), not DCL's ``-inf`` or
    MACL's 1."""
    if labels is None:
        return per_anchor
    return torch.where(lse_neg == float("-inf"), torch.zeros_like(per_anchor), per_anchor)
