"""Input validation shared by every public entry point.

Every check raises a ``ValueError`` or ``TypeError`` that names the argument and the offending
shape or value, so that a bad call fails at the call site instead of producing a NaN loss deep
inside a kernel.

The ``validate=`` policy of every loss (docs/math.md#validation-and-host-synchronisation):

- ``True`` (default): the structural checks only - types, shapes, dtypes, devices, options,
  Python scalars. They read no tensor data, so the default call path never synchronises the host
  with the device (no stall of a GPU pipeline, CUDA-graph capture works), and NaN/Inf inputs give
  a non-finite loss, as in PyTorch (``GradScaler`` relies on that to skip a step).
- ``"full"``: the structural checks plus the data checks (finiteness of the embeddings, the sign
  of a tensor ``logit_scale``), each a host synchronisation, with a clear ``ValueError``.
- ``False``: no checks at all (the caller vouches for the arguments).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

LAYOUTS = ("2n", "cross", "cross_sym")
REDUCTIONS = ("mean", "sum", "none")
SCHEDULES = ("linear", "exp")
TEMPERATURE_MODES = ("batch", "anchor")
BACKENDS = ("auto", "reference", "torch", "triton", "cpu", "cuda")
MOCO_LOSSES = ("infonce", "dcl", "macl")


def check_validate(value) -> str:
    """``validate=`` as one of ``"structural"`` (``True``), ``"full"``, ``"none"`` (``False``)."""
    if value is True:
        return "structural"
    if value is False:
        return "none"
    if isinstance(value, str) and value == "full":
        return "full"
    raise TypeError(f"validate must be True, False or 'full', got {type(value).__name__} "
                    f"{value!r}")


def _compiling() -> bool:
    """Under ``torch.compile`` the data-dependent checks (a host sync on the values) are skipped,
    as with ``validate=False``: they would break the graph. Shape, dtype and option checks stay."""
    return torch.compiler.is_compiling()


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_real(name: str, value) -> float:
    """A finite Python number (bools and tensors are rejected: they are almost always a mistake)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def check_positive(name: str, value) -> float:
    value = check_real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def check_open_unit(name: str, value) -> float:
    value = check_real(name, value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in the open interval (0, 1), got {value!r}")
    return value


def check_embedding_pair(
    name1: str, x1, name2: str, x2, *, validate="structural", min_rows: int = 1
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two ``[N, D]`` floating tensors of one shape, dtype and device, ``N >= min_rows``; finite
    when ``validate == "full"`` (a host synchronisation). ``validate="none"`` checks nothing."""
    if validate in (False, "none"):
        return x1, x2
    for name, x in ((name1, x1), (name2, x2)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
                f"got {x.dtype}"
            )
        if x.dim() != 2:
            raise ValueError(
                f"{name} must be 2-D [batch, dim], got {x.dim()}-D shape {tuple(x.shape)}"
            )
    if x1.shape != x2.shape:
        raise ValueError(
            f"{name1} and {name2} must have the same shape, got {tuple(x1.shape)} and "
            f"{tuple(x2.shape)}"
        )
    if x1.dtype != x2.dtype:
        raise TypeError(
            f"{name1} and {name2} must have the same dtype, got {x1.dtype} and {x2.dtype}"
        )
    if x1.device != x2.device:
        raise ValueError(
            f"{name1} and {name2} must be on the same device, got {x1.device} and {x2.device}"
        )
    n, d = x1.shape
    if n < min_rows:
        raise ValueError(
            f"{name1} and {name2} need at least {min_rows} row(s), got shape {tuple(x1.shape)}"
        )
    if d < 1:
        raise ValueError(f"{name1} and {name2} need at least 1 column, got shape {tuple(x1.shape)}")
    if validate == "full":
        check_finite(name1, x1)
        check_finite(name2, x2)
    return x1, x2


def check_finite(name: str, x: torch.Tensor) -> None:
    """The data check of ``validate="full"`` (a host synchronisation; skipped under
    ``torch.compile``)."""
    if _compiling():
        return
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{name} contains {bad} non-finite value(s) (NaN or Inf); with validate=True (the "
            f"default) such inputs give a non-finite loss instead of this error"
        )


def check_has_negatives(negatives_per_anchor: int, what: str) -> None:
    """Structural: every anchor needs at least one negative (counted from shapes, no data)."""
    if negatives_per_anchor < 1:
        raise ValueError(
            f"{what} leaves an anchor with no negative at all (the loss would be constant); "
            f"use a batch of at least 2 rows, or pass extra negatives"
        )


def check_negatives(name: str, x, like: torch.Tensor, validate="structural"):
    """Extra candidate rows ``[K', D]`` (any floating dtype, the embeddings' device and width),
    or ``None``."""
    if x is None or validate in (False, "none"):
        return x
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != like.shape[1]:
        raise ValueError(
            f"{name} must be 2-D [K, D] with the embeddings' width D = {like.shape[1]}, got "
            f"shape {tuple(x.shape)}"
        )
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but the embeddings are on {like.device}")
    if validate == "full":
        check_finite(name, x)
    return x


def check_bank(name: str, x, like: torch.Tensor, validate="structural"):
    """A memory bank ``[Q, D]`` of any floating dtype and device (cast per call)."""
    if validate in (False, "none"):
        return x
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != like.shape[1]:
        raise ValueError(
            f"{name} must be 2-D [size, D] with the queries' width D = {like.shape[1]}, got "
            f"shape {tuple(x.shape)}"
        )
    if validate == "full":
        check_finite(name, x)
    return x


def check_scalar_tensor(name: str, x: torch.Tensor, like: torch.Tensor, forms: str) -> None:
    """A learnable scalar given as a tensor (CLIP's scale, SigLIP's bias): one element, a
    floating dtype, on the features' device (or the CPU)."""
    if x.numel() != 1 or x.dim() > 1:
        raise ValueError(f"{name} must be a scalar ({forms}), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.device != like.device and x.device.type != "cpu":
        raise ValueError(f"{name} is on {x.device} but the features are on {like.device}")


def check_logit_scale(
    logit_scale, like: torch.Tensor, *, validate="structural", any_sign: bool = False
) -> Union[float, torch.Tensor]:
    """CLIP's already-exponentiated scale: a positive float or a 0-d (or 1-element) tensor
    (``any_sign``: any finite float, as OpenCLIP computes with it). A tensor's sign is data:
    checked with ``validate="full"`` only."""
    if validate in (False, "none"):
        return logit_scale.reshape(()) if isinstance(logit_scale, torch.Tensor) else \
            float(logit_scale)
    if isinstance(logit_scale, torch.Tensor):
        check_scalar_tensor("logit_scale", logit_scale, like, "0-d tensor or float")
        if validate == "full" and not _compiling():
            value = float(logit_scale.detach().reshape(()))
            if not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"logit_scale must be finite and > 0 (it is the already-exponentiated "
                    f"scale, e.g. model.logit_scale.exp()), got {value!r}"
                )
        return logit_scale.reshape(())
    if any_sign:
        return check_real("logit_scale", logit_scale)
    return check_positive("logit_scale", logit_scale)


def check_image_text(image_features, text_features, *, validate="structural") -> Tuple[int, int]:
    """SigLIP's features: ``image_features [B, D]`` and ``text_features [K, D]`` floating tensors of
    one dtype and device, ``B >= 1`` (one image has its positive and no negatives: a valid
    batch), ``K >= B`` (text ``i`` is image ``i``'s positive; texts past ``B`` are extra
    negatives); finite under ``validate="full"`` only (a host synchronisation). Returns
    ``(B, K)``; ``validate="none"`` checks nothing."""
    if validate in (False, "none"):
        return image_features.shape[0], text_features.shape[0]
    names = ("image_features", "text_features")
    for name, x in zip(names, (image_features, text_features)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
                f"got {x.dtype}"
            )
        if x.dim() != 2:
            raise ValueError(
                f"{name} must be 2-D [batch, dim], got {x.dim()}-D shape {tuple(x.shape)}"
            )
    (B, D), (K, D_text) = image_features.shape, text_features.shape
    if D != D_text:
        raise ValueError(f"image_features and text_features must have the same width, got "
                         f"shapes {tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if image_features.dtype != text_features.dtype:
        raise TypeError(f"image_features and text_features must have the same dtype, got "
                        f"{image_features.dtype} and {text_features.dtype}")
    if image_features.device != text_features.device:
        raise ValueError(f"image_features and text_features must be on the same device, got "
                         f"{image_features.device} and {text_features.device}")
    if B < 1 or D < 1:
        raise ValueError(f"image_features needs at least 1 row and 1 column, got shape "
                         f"{tuple(image_features.shape)}")
    if K < B:
        raise ValueError(f"text_features needs at least as many rows as image_features (text i "
                         f"is image i's positive), got {K} texts for {B} images")
    if validate == "full":
        for name, x in zip(names, (image_features, text_features)):
            check_finite(name, x)
    return B, K


def check_logit_bias(
    logit_bias, like: torch.Tensor, *, validate="structural"
) -> Union[None, float, torch.Tensor]:
    """SigLIP's additive logit bias: ``None``, a finite float or a 0-d (or 1-element) floating
    tensor (which may require grad). A tensor's finiteness is data: checked with
    ``validate="full"`` only; ``validate="none"`` checks nothing."""
    if logit_bias is None:
        return None
    if validate in (False, "none"):
        return logit_bias.reshape(()) if isinstance(logit_bias, torch.Tensor) else \
            float(logit_bias)
    if isinstance(logit_bias, torch.Tensor):
        check_scalar_tensor("logit_bias", logit_bias, like, "0-d tensor, float or None")
        if validate == "full" and not _compiling():
            value = float(logit_bias.detach().reshape(()))
            if not math.isfinite(value):
                raise ValueError(f"logit_bias must be finite, got {value!r}")
        return logit_bias.reshape(())
    return check_real("logit_bias", logit_bias)


def check_backend(backend: str) -> str:
    return check_choice("backend", backend, BACKENDS)


def optional_tensor_arg(name: str, x: Optional[torch.Tensor], rows: int, like: torch.Tensor):
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if x.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but the embeddings are on {like.device}")
    return x


def check_labels(name: str, labels, rows: int, like: torch.Tensor,
                 mode: str) -> Optional[torch.Tensor]:
    """``None`` or a 1-D integer tensor of ``rows`` entries on ``like``'s device."""
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D integer tensor, got {type(labels).__name__}")
    if mode == "none":
        return labels
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"{name} must have shape [{rows}], got {list(labels.shape)}")
    if labels.device != like.device:
        raise ValueError(f"{name} must be on the embeddings' device {like.device}, got "
                         f"{labels.device}")
    return labels
