"""Drop-in ``nn.Module`` losses with the constructor arguments, defaults, forward signatures and
argument checks of the libraries users already have (lightly's ``MACLLoss``, ``NTXentLoss``,
``DCLLoss``, ``DCLWLoss``; OpenCLIP's ``ClipLoss`` and ``SigLipLoss``), plus a keyword-only
``backend=``.

Swap ``from lightly.loss import MACLLoss`` for ``from macl_kernels import MACLLoss``: same numbers
(to float64 rounding; where lightly's ``1e-8`` in ``1 / (1 - P + 1e-8)`` matters, i.e.
``1 - P < 1e-6``, this package keeps the exact reweighting, docs/math.md#macl).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from . import _validate as V
from . import distributed as MD
from . import functional as MF
from ._math import normalize

_LIGHTLY_EPS = 1e-8


def _check_gather_distributed(gather_distributed: bool) -> None:
    if gather_distributed and not torch_dist.is_available():
        raise ValueError(
            "gather_distributed is True but torch.distributed is not available. Please set "
            "gather_distributed=False or install a torch version with distributed support."
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
        loss, tau, alignment = MF._macl(
            z0, z1, temperature=self.temperature, alpha=self.alpha, a0=self.A_0,
            schedule="linear", temperature_mode="batch", reweight=True, layout="2n",
            normalize=True, reduction="mean", gather_distributed=self.gather_distributed,
            backend=self.backend,
            validate=True,
        )
        self.last_temperature, self.last_alignment = tau, alignment
        return loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, A_0={self.A_0}, backend={self.backend!r}"


class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR), lightly's ``NTXentLoss(temperature=0.5, memory_bank_size=0,
    gather_distributed=False)``: ``forward(out0, out1)``, mean over the ``2N`` anchors."""

    def __init__(self, temperature: float = 0.5,
                 memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        if abs(temperature) < _LIGHTLY_EPS:
            raise ValueError(f"Illegal temperature: abs({temperature}) < 1e-8")
        _check_gather_distributed(gather_distributed)
        if memory_bank_size not in (0, (0,), [0]):
            raise NotImplementedError(
                f"memory_bank_size={memory_bank_size!r}: the MoCo memory bank is not supported by "
                f"macl-kernels' NTXentLoss; use lightly's NTXentLoss for it, or memory_bank_size=0"
            )
        self.temperature = temperature
        self.memory_bank_size = memory_bank_size
        self.gather_distributed = gather_distributed
        self.backend = V.check_backend(backend)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return MF.infonce_loss(out0, out1, temperature=self.temperature, layout="2n",
                               gather_distributed=self.gather_distributed, backend=self.backend)


class DCLLoss(nn.Module):
    """Decoupled contrastive loss, lightly's ``DCLLoss(temperature=0.1, weight_fn=None,
    gather_distributed=False)``. ``weight_fn(out0, out1)`` (on the normalised views) returns the
    ``[N]`` positive weights; it is called as ``weight_fn(out1, out0)`` for the second view."""

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
        V.check_embedding_pair("out0", out0, "out1", out1, validate=False)
        u0, u1 = normalize(out0), normalize(out1)
        n = u0.shape[0]

        def as_rows(w):
            return torch.broadcast_to(torch.as_tensor(w, dtype=u0.dtype, device=u0.device), (n,))

        return torch.cat([as_rows(self.weight_fn(u0, u1)), as_rows(self.weight_fn(u1, u0))])

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return MF.dcl_loss(out0, out1, temperature=self.temperature, layout="2n",
                           weights=self._weights(out0, out1),
                           gather_distributed=self.gather_distributed, backend=self.backend)


class DCLWLoss(DCLLoss):
    """Weighted DCL, lightly's ``DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False)``:
    ``w_i = 2 - N softmax_i(u0_i . u1_i / sigma)``, without gradient."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__(temperature=temperature, weight_fn=None,
                         gather_distributed=gather_distributed, backend=backend)
        self.sigma = sigma

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return MF.dcl_loss(out0, out1, temperature=self.temperature, weighted=True,
                           sigma=self.sigma, layout="2n",
                           gather_distributed=self.gather_distributed, backend=self.backend)


class ClipLoss(nn.Module):
    """OpenCLIP's ``ClipLoss``: ``forward(image_features, text_features, logit_scale,
    output_dict=False)``. Like OpenCLIP it does not normalise the features (the model does) and
    ``logit_scale`` is the already-exponentiated scale.

    With ``world_size > 1`` (an initialised ``torch.distributed`` group of that size) the
    features of every rank are gathered, with OpenCLIP's meaning of the options:
    ``local_loss=True``: this rank's rows against every rank's columns (labels offset by
    ``rank * n``); ``local_loss=False``: every rank computes the loss of the whole global batch.
    ``gather_with_grad=True``: the gather's backward all-reduces, so gradients reach every rank's
    features; ``False``: only the local slice of the gathered features carries gradient.
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
        self.cache_labels = cache_labels  # no labels tensor exists here: nothing to cache
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = V.check_backend(backend)

    def _check_group(self) -> None:
        if not (torch_dist.is_available() and torch_dist.is_initialized()):
            raise RuntimeError(
                f"ClipLoss(world_size={self.world_size}) needs an initialised torch.distributed "
                f"process group (torch.distributed.init_process_group)"
            )
        actual = (torch_dist.get_rank(), torch_dist.get_world_size())
        if actual != (self.rank, self.world_size):
            raise ValueError(
                f"ClipLoss(rank={self.rank}, world_size={self.world_size}) does not match the "
                f"process group (rank {actual[0]}, world size {actual[1]})"
            )

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                output_dict: bool = False):
        gather_kind = "with_grad" if self.gather_with_grad else "local_grad"
        common = dict(normalize=False, reduction="mean", backend=self.backend, validate=True,
                      gather_kind=gather_kind)
        if self.world_size == 1:
            loss = MF._clip(image_features, text_features, logit_scale,
                            gather_distributed=False, **common)
        else:
            self._check_group()
            if self.local_loss:
                loss = MF._clip(image_features, text_features, logit_scale,
                                gather_distributed=True, **common)
            else:
                ctx = MD.context(True)
                gather = MD.gather_with_grad if self.gather_with_grad else MD.gather_local_grad
                V.check_embedding_pair("image_features", image_features, "text_features",
                                       text_features, validate=False)
                MD.check_equal_rows(image_features.shape[0], image_features.device, ctx)
                loss = MF._clip(gather(image_features, ctx), gather(text_features, ctx),
                                logit_scale, gather_distributed=False, **common)
        return {"contrastive_loss": loss} if output_dict else loss


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
        if not (torch_dist.is_available() and torch_dist.is_initialized()):
            raise RuntimeError(
                f"SigLipLoss(world_size={self.world_size}) needs an initialised torch.distributed "
                f"process group (torch.distributed.init_process_group)"
            )
        actual = (torch_dist.get_rank(), torch_dist.get_world_size())
        if actual != (self.rank, self.world_size):
            raise ValueError(
                f"SigLipLoss(rank={self.rank}, world_size={self.world_size}) does not match the "
                f"process group (rank {actual[0]}, world size {actual[1]})"
            )

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        if self.world_size > 1:
            self._check_group()
        loss = MF._siglip(image_features, text_features, logit_scale, logit_bias,
                          normalize=False, reduction="mean",
                          gather_distributed=self.world_size > 1, backend=self.backend,
                          validate=True)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, "
                f"backend={self.backend!r}")
