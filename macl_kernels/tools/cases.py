"""The one registry of verification cases: which loss configurations exist, in which layouts,
at which dtypes, and to which tolerance each backend must match the float64 reference.

``macl-kernels verify``, ``bench``, ``profile`` and the test suite all import it, so a loss or a
tolerance is declared once. The tolerances and the reasons for them: ``docs/math.md#tolerances``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import functional as F
from ..functional import LAYOUTS

DTYPES: Dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Relative error ||got - want|| / ||want|| against the float64 reference, for the loss and every
# gradient; the inputs are rounded to the tested dtype before the reference sees them, so these
# bound a backend's arithmetic, not the rounding of its inputs.
TOLERANCES: Dict[str, float] = {
    "float64": 1e-10,  # to float64 rounding
    "float32": 1e-5,
    "bfloat16": 2e-2,  # half-precision GEMM operands (fp32 statistics)
    "float16": 2e-2,
}
# Backends whose float32 dot products may run in tf32 (10-bit mantissa) get a looser bound.
BACKEND_TOLERANCES: Dict[Tuple[str, str], float] = {("triton", "float32"): 1e-3}

CLIP_SCALE = 1 / 0.07  # CLIP's initial logit scale, exp(log(1 / 0.07))
# SigLIP's initial logit bias (OpenCLIP's --siglip: init_logit_bias = -10); its cases take the
# registry's one logit scale (CLIP_SCALE) as well.
SIGLIP_BIAS = -10.0


def tolerance(backend: str, dtype_name: str) -> float:
    """The relative-error bound of ``backend`` at ``dtype_name`` against the float64 reference."""
    return BACKEND_TOLERANCES.get((backend, dtype_name), TOLERANCES[dtype_name])


class LossCase(NamedTuple):
    """One loss configuration: ``fn(z1, z2, **kwargs)`` in each of ``layouts``. CLIP has the
    one layout ``cross_sym`` and takes ``logit_scale`` instead of a layout; SigLIP likewise,
    with the one layout ``cross`` (the images are the anchors)."""

    name: str
    fn: Callable
    kwargs: dict
    layouts: Tuple[str, ...] = LAYOUTS
    uses_logit_scale: bool = False

    def call(self, z1: torch.Tensor, z2: torch.Tensor, layout: str, *,
             logit_scale=CLIP_SCALE, **options) -> torch.Tensor:
        """The loss on ``(z1, z2)`` in ``layout``; ``options`` (``backend``, ``reduction``,
        ``validate``, ...) go to the loss function."""
        if layout not in self.layouts:
            raise ValueError(f"loss case {self.name!r} has layouts {list(self.layouts)}, got "
                             f"{layout!r}")
        if self.uses_logit_scale:
            return self.fn(z1, z2, logit_scale, **self.kwargs, **options)
        return self.fn(z1, z2, layout=layout, **self.kwargs, **options)


def _case(name: str, fn: Callable, **kwargs) -> LossCase:
    return LossCase(name, fn, kwargs)


def case_labels(n: int, device) -> torch.Tensor:
    """The fixed labels of the label cases: ``n`` samples in ``max(1, n // 4)`` classes (the
    class of sample ``i`` is ``i mod C``; about four samples per class)."""
    return torch.arange(n, device=device) % max(1, n // 4)


def _with_case_labels(fn: Callable) -> Callable:
    """False-negative masking (``labels=``) with the fixed labels of ``case_labels``."""
    def call(z1, z2, **kwargs):
        return fn(z1, z2, labels=case_labels(z1.shape[0], z1.device), **kwargs)
    call.__name__ = f"{fn.__name__}_labels"
    return call


def _supcon_two_views(z1, z2, *, layout="2n", normalize=True, **kwargs):
    """``supcon_loss`` on the two views as ``V = 2`` (rows view-major: the anchors of layout
    ``2n``), normalised inside unless ``normalize=False``, labels of ``case_labels``."""
    from ..supervised import supcon_loss
    return supcon_loss(torch.stack([z1, z2], dim=1), case_labels(z1.shape[0], z1.device),
                       normalize=normalize, **kwargs)


LOSS_CASES: Dict[str, LossCase] = {case.name: case for case in [
    _case("infonce", F.infonce_loss, temperature=0.1),
    LossCase("clip", F.clip_loss, {}, ("cross_sym",), uses_logit_scale=True),
    _case("dcl", F.dcl_loss, temperature=0.1),
    _case("dclw", F.dcl_loss, temperature=0.1, weighted=True),
    _case("macl", F.macl_loss),
    _case("macl_anchor", F.macl_loss, temperature_mode="anchor"),
    _case("macl_exp", F.macl_loss, schedule="exp", alpha=2.0),  # the 2022 preprint's rule
    _case("macl_noreweight", F.macl_loss, reweight=False),
    _case("tfree", F.tfree_loss),
    LossCase("siglip", F.siglip_loss, {"logit_bias": SIGLIP_BIAS}, ("cross",),
             uses_logit_scale=True),
]}

# The label losses (docs/math.md#label-masked-negatives, #supervised-contrastive-supcon) with
# fixed labels: ``verify``, ``bench`` and ``profile`` cover them; the generic loss tests do not
# iterate over them (their closed forms and layouts assume instance positives), the label tests
# (tests/test_label_masking.py, test_supcon.py) cover them instead.
LABEL_CASES: Dict[str, LossCase] = {case.name: case for case in [
    _case("infonce_labels", _with_case_labels(F.infonce_loss), temperature=0.1),
    _case("macl_labels", _with_case_labels(F.macl_loss)),
    LossCase("supcon", _supcon_two_views, dict(temperature=0.1, base_temperature=0.1), ("2n",)),
]}
ALL_CASES: Dict[str, LossCase] = {**LOSS_CASES, **LABEL_CASES}

# Every (loss, layout) pair that exists.
LOSS_LAYOUTS: List[Tuple[str, str]] = [
    (case.name, layout) for case in LOSS_CASES.values() for layout in case.layouts]


def case_name(name: str) -> str:
    """The registry's spelling of a case name (``macl-anchor`` is accepted for
    ``macl_anchor``)."""
    return name.strip().replace("-", "_")


def select_cases(names: Optional[Sequence[str]] = None) -> List[LossCase]:
    """The cases called ``names`` (all, label cases included, when ``None``); ``ValueError``
    naming unknown ones."""
    if names is None:
        return list(ALL_CASES.values())
    names = [case_name(n) for n in names]
    unknown = [n for n in names if n not in ALL_CASES]
    if unknown:
        raise ValueError(f"unknown loss configuration(s) {unknown}; choose from "
                         f"{list(ALL_CASES)}")
    return [ALL_CASES[n] for n in names]


def num_anchors(n: int, layout: str) -> int:
    """Anchor rows of ``layout`` for ``n`` rows per view."""
    return n if layout == "cross" else 2 * n


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (the absolute difference when the
    reference is 0). NaN anywhere gives NaN, which no ``<= tolerance`` check passes."""
    actual = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    expected = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    diff = float(torch.linalg.vector_norm(actual - expected))
    scale = float(torch.linalg.vector_norm(expected))
    return diff / scale if scale > 0 else diff


def make_views(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64,
               random_norms: bool = True):
    """Two correlated views ``[n, d]``, positives more similar than negatives as in training
    (MACL's alignment is not ~0); with ``random_norms`` the rows' norms vary (0.5-3), exercising
    the normalisation's backward. Returns ``(z1, z2, generator)``: the generator continues the
    seeded stream (e.g. for an upstream gradient)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=gen, dtype=torch.float64)
    views = []
    for _ in range(2):
        view = base + 0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)
        if random_norms:
            view = view * (0.5 + 2.5 * torch.rand(n, 1, generator=gen, dtype=torch.float64))
        views.append(view.to(dtype))
    return views[0], views[1], gen
