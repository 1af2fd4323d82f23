"""Drop-in ``nn.Module`` losses with the constructor arguments, defaults, forward signatures and
argument checks of the libraries users already have (lightly's ``MACLLoss``, ``NTXentLoss``,
``DCLLoss``, ``DCLWLoss``; OpenCLIP's ``ClipLoss`` and ``SigLipLoss``), plus a keyword-only
``backend=``.

Swap ``from lightly.loss import MACLLoss`` for ``from macl_kernels import MACLLoss``: same numbers
(to float64 rounding; where lightly's ``1e-8`` in ``1 / (1 - P + 1e-8)`` matters, i.e.
``1 - P < 1e-6``, this package keeps the exact reweighting, docs/math.md#macl).

Edge behaviour is the peers' (docs/math.md#drop-in-edge-behaviour): NaN/Inf inputs give a
non-finite loss (no data checks, no host synchronisation); a global batch of one row gives 0
connected to the graph (NTXent, MACL, ClipLoss), or ``-inf`` (DCL/DCLW: the log-sum-exp over no
negatives, as lightly computes it); a negative temperature is computed with where the peer does
(NTXent, DCL, DCLW; ClipLoss with a negative float ``logit_scale``).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.distributed as torch_dist
from torch import Tensor, nn

from . import _validate as V
from . import distributed as MD
from . import functional as MF
from ._assembly import peer_semantics
from ._math import normalize

_LIGHTLY_EPS = 1e-8


def _global_rows(n: int, gather_distributed: bool) -> int:
    ctx = MD.context(gather_distributed)
    return n * (1 if ctx is None else ctx.world_size)


def _zero_connected(*tensors: Tensor) -> Tensor:
    """The peers' loss for a batch whose anchors have no negative: 0, with zero gradients that
    still reach every input (and NaN where an input is NaN, as the peers' would be)."""
    return sum(t.sum() for t in tensors) * 0.0


def _check_gather_distributed(gather_distributed: bool) -> None:
    if gather_distributed and not torch_dist.is_available():
        raise ValueError(
            "gather_distributed is True but torch.distributed is not available. Please set "
            "gather_distributed=False or install a torch version with distributed support."
        )


def _check_process_group(owner: str, rank: int, world_size: int) -> None:
    """OpenCLIP's losses take ``rank`` / ``world_size`` as arguments: they must describe the
    initialised process group the gathers will use."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        raise RuntimeError(
            f"{owner}(world_size={world_size}) needs an initialised torch.distributed "
            f"process group (torch.distributed.init_process_group)"
        )
    actual = (torch_dist.get_rank(), torch_dist.get_world_size())
    if actual != (rank, world_size):
        raise ValueError(
            f"{owner}(rank={rank}, world_size={world_size}) does not match the "
            f"process group (rank {actual[0]}, world size {actual[1]})"
        )


class MACLLoss(nn.Module):
    """Model-Aware Contrastive Loss, lightly's ``MACLLoss(temperature, alpha, A_0)``.

    ``forward(z0, z1)`` with ``[N, D]`` views returns the mean MACL loss over the ``2N`` anchors
    (layout ``"2n"``). After each call ``last_temperature`` and ``last_alignment`` hold the step's
    ``tau(A)`` and ``A`` as detached 0-d tensors (no host synchronisation), for logging.
    ``gather_distributed`` (keyword-only; lightly's MACLLoss has none) gathers the candidates of
    every rank and makes ``A`` the global batch's alignment.
    """

    def __init__(self, temperature: float = 0.1, alpha: float = 0.5, A_0: float = 0.0, *,
                 gather_distributed: bool = False, backend: str = "auto"):
        super().__init__()
        if temperature < _LIGHTLY_EPS:
            raise ValueError(f"Illegal initial temperature: abs({temperature}) < 1e-8")
        if alpha < 0 or alpha > 1:
            raise ValueError(f"Alpha must be in the range [0, 1], got {alpha}.")
        if A_0 < 0 or A_0 > 1:
            raise ValueError(f"A_0 must be in the range [0, 1], got {A_0}.")
        _check_gather_distributed(gather_distributed)
        self.gather_distributed = gather_distributed
        self.temperature = temperature
        self.alpha = alpha
        self.A_0 = A_0
        self.backend = V.check_backend(backend)
        self.last_temperature: Optional[Tensor] = None
        self.last_alignment: Optional[Tensor] = None

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        if isinstance(z0, Tensor) and z0.dim() == 2 and z0.shape[0] == 1 and \
                _global_rows(1, self.gather_distributed) == 1:
            # lightly: P_ap = 1 with no negative, and (1 - P + 1e-8)^-1 * -log P = 0.
            V.check_embedding_pair("z0", z0, "z1", z1)
            self.last_temperature = self.last_alignment = None
            return _zero_connected(z0, z1)
        with peer_semantics() as call:  # strict options; it hands back (tau, A)
            loss = MF.macl_loss(
                z0, z1, temperature=self.temperature, alpha=self.alpha, a0=self.A_0,
                schedule="linear", temperature_mode="batch", reweight=True, layout="2n",
                normalize=True, reduction="mean", gather_distributed=self.gather_distributed,
                backend=self.backend, validate=True)
        self.last_temperature, self.last_alignment = call.stats
        return loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, A_0={self.A_0}, backend={self.backend!r}"


class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR), lightly's ``NTXentLoss(temperature=0.5, memory_bank_size=0,
    gather_distributed=False)``: ``forward(out0, out1)``.

    ``memory_bank_size=0``: mean over the ``2N`` anchors of layout ``"2n"`` (gathered over the
    ranks with ``gather_distributed``).

    ``memory_bank_size=(size, dim)`` (lightly >= 1.6), or a bare ``size`` (lightly's older form:
    ``dim`` is taken from the first batch, with lightly's ``UserWarning``): lightly's / MoCo's
    memory bank (docs/math.md#memory-bank-moco). The queries ``out0`` are the only anchors; the
    negatives are the bank alone, as it was before this step's enqueue (no in-batch negatives);
    the positive is ``out1``. When ``out0`` requires grad, the normalised ``out1`` (detached) is
    enqueued: at pointer ``p``, rows ``p .. p + n`` of the bank, or, if that reaches the end, rows
    ``p ..`` end and the pointer returns to 0 (the keys past the end are dropped, as in lightly).
    With ``gather_distributed`` every rank's keys are enqueued (the loss stays local). The bank
    starts as ``normalize(randn(size, dim))`` drawn from the global RNG at the same moment as
    lightly's (construction, or the first call for a bare size), so that after the same
    ``torch.manual_seed`` both give the same losses and gradients step by step. It is a float32
    buffer (``.double()``/``.to()`` convert it like lightly's) cast to the queries' dtype per
    call. The pointer is kept on the host (it depends on batch sizes only): no host sync.

    ``bank`` and ``bank_ptr`` are non-persistent buffers, as in lightly (not in ``state_dict``:
    checkpoints load both ways, a resumed run restarts with a random bank);
    ``persistent_bank=True`` (keyword-only) puts them in the ``state_dict``.

    As lightly: a global batch of one row without a bank gives 0 connected to the graph, a
    negative temperature is computed with, NaN/Inf inputs give a non-finite loss. Unlike lightly:
    any floating query dtype works with the float32 bank (lightly raises for anything but
    float32 outside autocast).
    """

    def __init__(self, temperature: float = 0.5,
                 memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, *, backend: str = "auto",
                 persistent_bank: bool = False):
        super().__init__()
        if abs(temperature) < _LIGHTLY_EPS:
            raise ValueError(f"Illegal temperature: abs({temperature}) < 1e-8")
        _check_gather_distributed(gather_distributed)
        size = _bank_size(memory_bank_size)
        self.temperature = temperature
        self.memory_bank_size = memory_bank_size
        self.gather_distributed = gather_distributed
        self.backend = V.check_backend(backend)
        self.persistent_bank = V.check_bool("persistent_bank", persistent_bank)
        self._bank_shape = size
        self._bank_ptr = 0  # the truth; the buffer bank_ptr mirrors it without a host read
        self.register_buffer("bank", torch.empty(size, dtype=torch.float),
                             persistent=persistent_bank)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long),
                             persistent=persistent_bank)
        if isinstance(memory_bank_size, int) and memory_bank_size > 0:
            warnings.warn(
                f"Memory bank size 'size={memory_bank_size}' does not specify feature dimension. "
                f"It is recommended to set the feature dimension with 'size=(n, dim)' when "
                f"creating the memory bank. Distributed training might fail if the feature "
                f"dimension is not set.", UserWarning)
        elif len(size) > 1 and size[0] > 0:
            self._init_bank(size)

    @property
    def uses_memory_bank(self) -> bool:
        return self._bank_shape[0] > 0

    @torch.no_grad()
    def _init_bank(self, size: Tuple[int, ...]) -> None:
        # The draws of lightly's MemoryBankModule: randn in the default dtype on the CPU
        # generator, cast to the buffer's dtype and device, normalised there.
        bank = torch.randn(size).to(dtype=self.bank.dtype, device=self.bank.device)
        self.bank = F.normalize(bank, dim=-1)
        self.bank_ptr = torch.zeros(1, dtype=torch.long, device=self.bank.device)
        self._bank_ptr = 0

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        if self.gather_distributed:
            ctx = MD.context(True)
            if ctx is not None:
                keys = MD.gather_no_grad(keys, ctx)
        size, ptr, n = self.bank.shape[0], self._bank_ptr, keys.shape[0]
        keys = keys.detach().to(dtype=self.bank.dtype, device=self.bank.device)
        if ptr + n >= size:  # fill to the end, drop the rest, start over (lightly)
            self.bank[ptr:] = keys[:size - ptr]
            self._bank_ptr = 0
        else:
            self.bank[ptr:ptr + n] = keys
            self._bank_ptr = ptr + n
        self.bank_ptr.fill_(self._bank_ptr)  # a host scalar written to the device: no sync

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A persisted bank of a lazily sized module (bare int) loads into an uninitialised one.
        key = prefix + "bank"
        if key in state_dict and state_dict[key].dim() == 2 and self.bank.dim() == 1:
            self.bank = torch.empty_like(state_dict[key], dtype=self.bank.dtype,
                                         device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "bank_ptr" in state_dict:
            self._bank_ptr = int(self.bank_ptr)  # once per load, not per step

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if not self.uses_memory_bank:
            if _global_rows(out0.shape[0] if isinstance(out0, Tensor) and out0.dim() == 2
                            else 2, self.gather_distributed) == 1:
                V.check_embedding_pair("out0", out0, "out1", out1)
                return _zero_connected(out0, out1)  # lightly: the positive alone, loss 0
            with peer_semantics(lenient=True):
                return MF.infonce_loss(out0, out1, temperature=self.temperature, layout="2n",
                                       normalize=True, reduction="mean",
                                       gather_distributed=self.gather_distributed,
                                       backend=self.backend, validate=True)
        V.check_embedding_pair("out0", out0, "out1", out1)
        if self.bank.dim() == 1:  # a bare size: the width comes with the first batch
            self._init_bank((*self._bank_shape, *out0.shape[1:]))
        update = torch.is_grad_enabled() and out0.requires_grad
        with peer_semantics(lenient=True):
            loss = MF.moco_loss(out0, out1, self.bank, temperature=self.temperature,
                                loss="infonce", alpha=0.0, a0=0.0, schedule="linear",
                                temperature_mode="batch", in_batch_negatives=False,
                                normalize=True, reduction="mean", gather_distributed=False,
                                backend=self.backend, validate=True)
        if update:  # after the loss: it saw the bank before this step's keys
            self._enqueue(F.normalize(out1.detach(), dim=1))
        return loss

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, memory_bank_size={self.memory_bank_size!r}, "
                f"backend={self.backend!r}")


def _bank_size(memory_bank_size) -> Tuple[int, ...]:
    """lightly's ``size``: ``0``, ``size`` or ``(size, dim)``; negative entries are refused."""
    size = (memory_bank_size,) if isinstance(memory_bank_size, int) else tuple(memory_bank_size)
    if any(not isinstance(x, int) or isinstance(x, bool) for x in size):
        raise TypeError(f"memory_bank_size must be an int or a tuple of ints, got "
                        f"{memory_bank_size!r}")
    if any(x < 0 for x in size):
        raise ValueError(f"Illegal memory bank size {memory_bank_size}, all entries must be "
                         f"non-negative.")
    return size


class DCLLoss(nn.Module):
    """Decoupled contrastive loss, lightly's ``DCLLoss(temperature=0.1, weight_fn=None,
    gather_distributed=False)``. ``weight_fn(out0, out1)`` (on the normalised views) returns the
    ``[N]`` positive weights; it is called as ``weight_fn(out1, out0)`` for the second view.
    As lightly: a negative temperature is computed with, and a global batch of one row gives
    ``-inf`` (its anchors have no negative: the log-sum-exp over an empty set)."""

    def __init__(self, temperature: float = 0.1,
                 weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        _check_gather_distributed(gather_distributed)
        if weight_fn is not None and not callable(weight_fn):
            raise TypeError(f"weight_fn must be callable or None, got {type(weight_fn).__name__}")
        self.temperature = temperature
        self.weight_fn = weight_fn
        self.gather_distributed = gather_distributed
        self.backend = V.check_backend(backend)

    def _weights(self, out0: Tensor, out1: Tensor) -> Optional[Tensor]:
        if not self.weight_fn:
            return None
        V.check_embedding_pair("out0", out0, "out1", out1)
        u0, u1 = normalize(out0), normalize(out1)
        n = u0.shape[0]

        def as_rows(w):
            return torch.broadcast_to(torch.as_tensor(w, dtype=u0.dtype, device=u0.device), (n,))

        return torch.cat([as_rows(self.weight_fn(u0, u1)), as_rows(self.weight_fn(u1, u0))])

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        weights = self._weights(out0, out1)
        with peer_semantics(lenient=True):
            return MF.dcl_loss(out0, out1, temperature=self.temperature, weighted=False,
                               sigma=0.5, layout="2n", normalize=True, reduction="mean",
                               weights=weights, gather_distributed=self.gather_distributed,
                               backend=self.backend, validate=True)


class DCLWLoss(DCLLoss):
    """Weighted DCL, lightly's ``DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False)``:
    ``w_i = 2 - N softmax_i(u0_i . u1_i / sigma)``, without gradient."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__(temperature=temperature, weight_fn=None,
                         gather_distributed=gather_distributed, backend=backend)
        self.sigma = sigma

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        with peer_semantics(lenient=True):
            return MF.dcl_loss(out0, out1, temperature=self.temperature, weighted=True,
                               sigma=self.sigma, layout="2n", normalize=True, reduction="mean",
                               gather_distributed=self.gather_distributed,
                               backend=self.backend, validate=True)


class ClipLoss(nn.Module):
    """OpenCLIP's ``ClipLoss``: ``forward(image_features, text_features, logit_scale,
    logit_bias=None, output_dict=False)``, positional or keyword as OpenCLIP. Like OpenCLIP it
    does not normalise the features (the model does) and ``logit_scale`` is the
    already-exponentiated scale (any float, or a tensor: its sign is not checked).

    ``logit_bias`` is added to every logit, as OpenCLIP does; a scalar bias cancels in both
    softmaxes, so the loss is unchanged and the bias gets a zero gradient connected to the graph
    (DDP and weight decay see it as with OpenCLIP). A non-scalar bias is refused (OpenCLIP's
    models only have a scalar one).

    With ``world_size > 1`` (an initialised ``torch.distributed`` group of that size) the
    features of every rank are gathered with OpenCLIP's gradient semantics:

    - ``local_loss=True``: this rank's rows against every rank's columns;
      ``gather_with_grad=True``: the gather's backward sums every rank's gradient (all ranks'
      losses reach this rank's features); ``False``: every gathered row is a constant (as
      OpenCLIP, which detaches all of them in this mode): this rank's features get the gradient
      of their own rows' logits only.
    - ``local_loss=False``: every rank computes the loss of the whole global batch;
      ``gather_with_grad=True``: gradients of every rank's copy are summed; ``False``: only the
      local slice of the gathered features carries gradient.

    ``get_logits`` and ``get_ground_truth`` are OpenCLIP's (with ``prev_num_logits``, ``labels``
    and ``cache_labels``): they *materialise* the ``N x N`` logits, for subclasses written against
    OpenCLIP's class (``CoCaLoss``, ``DistillClipLoss``); ``forward`` itself never does.
    A global batch of one row gives 0, connected to the graph, as OpenCLIP.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, backend: str = "auto"):
        super().__init__()
        if use_horovod:
            raise NotImplementedError(
                "use_horovod=True: Horovod is not supported by macl-kernels; use torch.distributed"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = V.check_backend(backend)
        # OpenCLIP's label cache (get_ground_truth)
        self.prev_num_logits = 0
        self.labels = {}

    def _check_group(self) -> None:
        _check_process_group("ClipLoss", self.rank, self.world_size)

    def _gather(self, image_features: Tensor, text_features: Tensor):
        """OpenCLIP's ``gather_features``: every rank's rows, with its gradient semantics."""
        self._check_group()
        ctx = MD.context(True)
        MD.check_equal_rows(image_features.shape[0], image_features.device, ctx)
        if self.gather_with_grad:
            gather = MD.gather_with_grad
        elif self.local_loss:
            gather = MD.gather_no_grad
        else:
            gather = MD.gather_local_grad
        return gather(image_features, ctx), gather(text_features, ctx)

    def get_ground_truth(self, device, num_logits) -> Tensor:
        """OpenCLIP's: ``arange(num_logits)`` (offset by ``num_logits * rank`` with
        ``local_loss``), cached per device when ``cache_labels``."""
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_logits * self.rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
        else:
            labels = self.labels[device]
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """OpenCLIP's ``(logits_per_image, logits_per_text)``, materialised (``N x N``, or
        ``n x W n`` with ``local_loss``)."""
        if self.world_size > 1:
            all_image, all_text = self._gather(image_features, text_features)
            if self.local_loss:
                logits_per_image = logit_scale * image_features @ all_text.T
                logits_per_text = logit_scale * text_features @ all_image.T
            else:
                logits_per_image = logit_scale * all_image @ all_text.T
                logits_per_text = logits_per_image.T
        else:
            logits_per_image = logit_scale * image_features @ text_features.T
            logits_per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        return logits_per_image, logits_per_text

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        loss = self._fused_loss(image_features, text_features, logit_scale)
        if isinstance(logit_bias, Tensor):
            if logit_bias.numel() != 1:
                raise ValueError(
                    f"logit_bias must be a scalar (OpenCLIP's models have one), got shape "
                    f"{tuple(logit_bias.shape)}")
            # It cancels in both softmaxes: loss unchanged, gradient 0, still in the graph.
            loss = loss + (logit_bias * 0.0).sum().to(loss.dtype)
        elif logit_bias is not None:
            V.check_real("logit_bias", float(logit_bias))
        return {"contrastive_loss": loss} if output_dict else loss

    def _fused_loss(self, image_features, text_features, logit_scale) -> Tensor:
        common = dict(normalize=False, reduction="mean", backend=self.backend, validate=True)
        if self.world_size == 1:
            with peer_semantics(lenient=True):
                return MF.clip_loss(image_features, text_features, logit_scale,
                                    gather_distributed=False, **common)
        self._check_group()
        if self.local_loss:
            gather_kind = "with_grad" if self.gather_with_grad else "no_grad"
            with peer_semantics(lenient=True, gather_kind=gather_kind):
                return MF.clip_loss(image_features, text_features, logit_scale,
                                    gather_distributed=True, **common)
        V.check_embedding_pair("image_features", image_features, "text_features",
                               text_features)
        all_image, all_text = self._gather(image_features, text_features)
        with peer_semantics(lenient=True):
            return MF.clip_loss(all_image, all_text, logit_scale, gather_distributed=False,
                                **common)


SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class SigLipLoss(nn.Module):
    """OpenCLIP's ``SigLipLoss``: ``forward(image_features, text_features, logit_scale,
    logit_bias, output_dict=False)``, the pairwise sigmoid loss ``(1/B) sum_i sum_j
    softplus(-y_ij (t S_ij + b))`` over the ``B`` local image rows (docs/math.md#siglip). Like
    OpenCLIP it does not normalise the features (the model does); ``logit_scale`` is the
    already-exponentiated ``t``; ``logit_bias`` is a float, a 0-d tensor or ``None``.

    With ``world_size > 1`` (an initialised ``torch.distributed`` group of that size) the local
    images are the anchors and every rank's texts the candidates, as in OpenCLIP. Its four
    ``dist_impl`` values (``None`` = ``"bidir"``, ``"shift"``, ``"reduce"``, ``"gather"``) differ
    only in how the texts travel and compute the same loss and gradients; all four are accepted
    and run here as one all-gather of the ``[K, D]`` text features with gradient (backward: one
    all-reduce of the gathered ``[W K, D]`` gradient). ``cache_labels`` is stored and unused (no
    label matrix exists here; OpenCLIP does not use it either); ``chunk_size`` is accepted for
    OpenCLIP-main compatibility and changes nothing (the kernels are always tiled, with an exact
    softplus).
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, chunk_size: int = 0, *, backend: str = "auto"):
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be None or one of {list(SIGLIP_DIST_IMPLS)}, got "
                             f"{dist_impl!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.chunk_size = chunk_size
        self.backend = V.check_backend(backend)

    def _check_group(self) -> None:
        _check_process_group("SigLipLoss", self.rank, self.world_size)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        if self.world_size > 1:
            self._check_group()
        loss = MF.siglip_loss(image_features, text_features, logit_scale, logit_bias,
                              normalize=False, reduction="mean",
                              gather_distributed=self.world_size > 1, backend=self.backend,
                              validate=True)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, "
                f"backend={self.backend!r}")


class SupConLoss(nn.Module):
    """Supervised contrastive loss, pytorch-metric-learning's ``SupConLoss(temperature=0.1)``:
    ``forward(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``.

    Its semantics (docs/math.md#supervised-contrastive-supcon): rows L2-normalised (its
    ``CosineSimilarity``); every row an anchor against every other row (with ``ref_emb``: against
    every reference row, ``ref_labels`` their labels); ``loss_a = LSE_{C(a)} l - mean_{P(a)} l``
    without SupContrast's ``T / Tb`` factor; the mean over the anchors whose loss is ``> 0`` (its
    ``AvgNonZeroReducer``: anchors without a positive are left out); exactly 0 for a batch
    without a positive pair or without a negative pair. Views are rows with repeated labels.
    For SupContrast's form (``[B, V, D]`` features, ``T / Tb``, ``contrast_mode``, a mask) use
    ``macl_kernels.supcon_loss``.

    Not supported: ``indices_tuple`` (the miners' pairs; a ``ValueError``) and the ``distance``,
    ``reducer`` and regulariser arguments of pytorch-metric-learning's base class (a
    ``TypeError``). ``backend`` and ``validate`` are keyword-only additions.
    """

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto", validate=True,
                 **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"SupConLoss does not support {sorted(kwargs)} (pytorch-metric-"
                            f"learning's distance / reducer / regularizer options); it computes "
                            f"the cosine-similarity loss with the AvgNonZeroReducer")
        self.temperature = V.check_positive("temperature", temperature)
        self.backend = V.check_backend(backend)
        V.check_validate(validate)
        self.validate = validate

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend!r}"

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        if indices_tuple is not None:
            raise ValueError("indices_tuple (a miner's pairs or triplets) is not supported by "
                             "macl_kernels.SupConLoss: it computes the loss over all pairs; use "
                             "pytorch-metric-learning's SupConLoss with miners")
        from .supervised import _supcon_pml
        return _supcon_pml(embeddings, labels, ref_emb, ref_labels, self.temperature,
                           self.backend, self.validate)
