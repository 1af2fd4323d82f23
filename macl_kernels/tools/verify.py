"""``macl-kernels verify``: every usable backend against the float64 full-matrix reference,
loss and gradients, for every case of the registry (``_cases.py``), to the tolerances of
``docs/math.md#tolerances``."""

from __future__ import annotations

import sys
from typing import Dict, List, NamedTuple, Optional, Sequence, TextIO

import torch

from .cases import (
    CLIP_SCALE, DTYPES, LossCase, make_views, num_anchors, relative_error, select_cases,
    tolerance,
)
from .report import default_device, device_name, format_table
from ..primitive.backends import available_backends


class VerifyResult(NamedTuple):
    backend: str
    loss: str
    layout: str
    dtype: str
    errors: Dict[str, float]  # "loss", "dz1", "dz2" and, for CLIP, "dscale"
    tolerance: float
    error: Optional[str] = None  # an exception raised by the backend or the reference

    @property
    def ok(self) -> bool:
        # ``err <= tol`` is False for NaN, so a NaN never passes.
        return self.error is None and all(err <= self.tolerance for err in self.errors.values())


def _loss_and_grads(case: LossCase, z1, z2, logit_scale, *, layout, backend, upstream):
    """Per-anchor losses and the gradients of ``sum(upstream * loss)`` (a non-unit upstream
    gradient, so that a backend ignoring ``grad_output`` is caught)."""
    leaves = [z1, z2] + ([logit_scale] if case.uses_logit_scale else [])
    loss = case.call(z1, z2, layout, logit_scale=logit_scale, backend=backend,
                     reduction="none")
    grads = torch.autograd.grad(loss, leaves,
                                grad_outputs=upstream.to(device=loss.device, dtype=loss.dtype))
    return loss, dict(zip(["dz1", "dz2", "dscale"], grads))


def _errors(loss, grads, ref_loss, ref_grads) -> Dict[str, float]:
    errors = {"loss": relative_error(loss, ref_loss)}
    errors.update({k: relative_error(grads[k], ref_grads[k]) for k in ref_grads})
    return errors


def _fresh_leaves(*tensors, device="cpu", dtype=None):
    return [t.detach().to(device=device, dtype=dtype or t.dtype).requires_grad_()
            for t in tensors]


def verify_cases(n: int = 64, d: int = 32, seed: int = 0,
                 dtypes: Sequence[str] = ("float64", "float32"),
                 backends: Optional[Sequence[str]] = None, device: Optional[str] = None,
                 tolerances: Optional[Dict[str, float]] = None,
                 losses: Optional[Sequence[str]] = None) -> List[VerifyResult]:
    """Compare every (backend, loss, layout, dtype) against the float64 reference on the CPU.

    ``losses`` restricts the check to those names of ``LOSS_CASES`` (default: all);
    ``tolerances`` maps dtype names to relative-error bounds that replace the defaults.
    """
    device = device or default_device()
    cases = select_cases(losses)
    overrides = dict(tolerances or {})  # explicit tolerances win over per-backend defaults
    if backends is None:
        backends = [name for name, reason in available_backends(device).items()
                    if reason is None and name != "reference"]
    results = []
    for backend in backends:
        for dtype_name in dtypes:
            tol = overrides.get(dtype_name, tolerance(backend, dtype_name))
            for case in cases:
                for layout in case.layouts:
                    results.append(_verify_one(backend, case, layout, dtype_name, tol, n, d,
                                               seed, device))
    return results


def _verify_one(backend, case, layout, dtype_name, tol, n, d, seed, device):
    dtype = DTYPES[dtype_name]
    z1_64, z2_64, gen = make_views(n, d, seed)
    m = num_anchors(n, layout)
    upstream = torch.randn(m, generator=gen, dtype=torch.float64)
    scale_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    scale_64 = torch.tensor(CLIP_SCALE, dtype=scale_dtype).to(torch.float64)
    # Round the inputs to the tested dtype first; the reference sees exactly those values.
    z1, z2 = (z.to(dtype) for z in (z1_64, z2_64))
    scale = scale_64.to(scale_dtype)
    try:
        ref_loss, ref_grads = _loss_and_grads(
            case, *_fresh_leaves(z1, z2, scale, dtype=torch.float64), layout=layout,
            backend="reference", upstream=upstream)
        loss, grads = _loss_and_grads(case, *_fresh_leaves(z1, z2, scale, device=device),
                                      layout=layout, backend=backend, upstream=upstream)
    except Exception as exc:  # report, keep checking the other cases
        return VerifyResult(backend, case.name, layout, dtype_name, {}, tol,
                            f"{type(exc).__name__}: {exc}")
    return VerifyResult(backend, case.name, layout, dtype_name,
                        _errors(loss, grads, ref_loss, ref_grads), tol)


def format_verify_table(results: Sequence[VerifyResult]) -> str:
    def fmt(values, key):
        return f"{values[key]:.2e}" if key in values else "-"

    header = ["backend", "loss", "layout", "dtype", "loss err", "dz1 err", "dz2 err",
              "dscale err", "tol", "status"]
    rows = []
    for r in results:
        if r.error:
            status = "ERROR: " + r.error
        else:
            status = "ok" if r.ok else "FAIL"
        rows.append([r.backend, r.loss, r.layout, r.dtype, fmt(r.errors, "loss"),
                     fmt(r.errors, "dz1"), fmt(r.errors, "dz2"), fmt(r.errors, "dscale"),
                     f"{r.tolerance:.0e}", status])
    return format_table(header, rows, right_align=[False] * 4 + [True] * 5)


def run_verify(n: int = 64, d: int = 32, seed: int = 0,
               dtypes: Sequence[str] = ("float64", "float32"),
               backends: Optional[Sequence[str]] = None, device: Optional[str] = None,
               tolerances: Optional[Dict[str, float]] = None,
               losses: Optional[Sequence[str]] = None,
               out: Optional[TextIO] = None) -> int:
    """Run :func:`verify_cases`, print the table and a summary; return the exit status
    (0 all within tolerance, 1 any miss or error, 2 nothing to check)."""
    out = out or sys.stdout
    device = device or default_device()
    results = verify_cases(n=n, d=d, seed=seed, dtypes=dtypes, backends=backends,
                           device=device, tolerances=tolerances, losses=losses)
    if not results:
        reasons = {k: v for k, v in available_backends(device).items() if v is not None}
        print(f"verify: no backend other than 'reference' is usable on {device}; "
              f"reasons: {reasons}", file=out)
        return 2
    print(f"verify: N={n}, D={d}, seed={seed}, device={device} ({device_name(device)}), "
          f"against the float64 reference; relative errors, random non-unit upstream gradient",
          file=out)
    print(format_verify_table(results), file=out)
    failed = [r for r in results if not r.ok]
    all_errors = [e for r in results for e in r.errors.values()]
    worst = max((e for e in all_errors if e == e), default=float("nan"))  # e != e: NaN
    nans = sum(1 for e in all_errors if e != e)
    backends_run = sorted({r.backend for r in results})
    print("", file=out)
    print(f"{len(results) - len(failed)}/{len(results)} checks passed "
          f"(backends: {', '.join(backends_run)}; worst finite relative error {worst:.2e}"
          + (f"; {nans} NaN" if nans else "") + ")"
          + (f"; {len(failed)} FAILED" if failed else ""), file=out)
    return 1 if failed else 0
