"""CLIP on the cuda backend: both directions from one tile (``both_directions=True``: one primitive
call, each tile of ``S`` serving the rows and the columns) against two plain primitive calls, one
per direction, side by side in one process on one GPU.

Both sides are CLIP's loss built from public names (``macl_kernels.primitive.negative_lse``) as
``clip_loss`` builds it (``macl_kernels/_assembly.py``, layout ``cross_sym`` on one process):
rows normalised in the compute dtype (float32 for half inputs, which reach the kernels as
``operand_dtype``), positive similarities ``u1_a . u2_a``, ``inv_temp`` the logit scale for every
anchor, ``loss = mean(softplus(lse_neg - inv_temp * s_pos))``. They differ only in the primitive:

* one tile: ``negative_lse(backend, u1, u2, inv_temp [2N], pos_index [2N], None,
  both_directions=True)``, rows (image anchors against text candidates) first, then columns;
* two calls: ``negative_lse(backend, u1, u2, inv_temp [N], arange(N), None)`` (image anchors,
  text candidates) and ``negative_lse(backend, u2, u1, inv_temp [N], arange(N), None)`` (text
  anchors, image candidates), concatenated in that order.

Reports per (N, D, dtype): the median forward+backward time of each path (CUDA events), their
ratio, the one-tile path's useful GFLOP/s (``macl_kernels.tools.roofline.useful_flops``: CLIP's
4 N^2 D multiply-adds per step, docs/math.md#roofline-useful-work-and-the-matmul-rate) and the
largest relative difference (norm-wise) of the loss and gradients between the two paths. Needs a
CUDA GPU and the built extension.

    python bench/gpu/cuda_clip_both_directions.py --n 2048,4096,8192 --dim 128,512 \
        --dtype float32,bfloat16 --repeats 20

``--dry-run`` (no GPU): checks the arguments, then runs each (D, dtype) once at N = 64 on the CPU
with backend ``torch`` (or ``--backend`` where it serves the CPU) and checks that both paths and
``macl_kernels.clip_loss`` agree (exit status 1 when they do not); no timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

import macl_kernels as mk
from macl_kernels.primitive import LogitMap, negative_lse
from macl_kernels.tools.roofline import useful_flops

# --dry-run's agreement bound (norm-wise relative difference; the two paths sum the same terms
# in another order, clip_loss normalises with a fused backward).
DRY_RUN_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2,
                torch.float16: 1e-3}


def clip_from_primitive(z1, z2, scale, backend, both_directions):
    """CLIP's mean loss from the primitive: one call in both directions, or one per direction."""
    wide = torch.float32 if z1.dtype in (torch.float16, torch.bfloat16) else z1.dtype
    u1, u2 = (F.normalize(z.to(wide), dim=1) for z in (z1, z2))
    n = u1.shape[0]
    positives = torch.arange(n, device=u1.device)
    s_pos = (u1 * u2).sum(dim=1)
    inv_temp = scale.to(device=u1.device, dtype=wide).expand(n)
    if both_directions:
        lse_neg = negative_lse(backend, u1, u2, inv_temp.repeat(2), positives.repeat(2), None,
                               LogitMap.SCALED, operand_dtype=z1.dtype, both_directions=True)
    else:
        rows = negative_lse(backend, u1, u2, inv_temp, positives, None, LogitMap.SCALED,
                            operand_dtype=z1.dtype)  # image anchors, text candidates
        cols = negative_lse(backend, u2, u1, inv_temp, positives, None, LogitMap.SCALED,
                            operand_dtype=z1.dtype)  # text anchors, image candidates
        lse_neg = torch.cat([rows, cols])
    x = lse_neg - inv_temp.repeat(2) * s_pos.repeat(2)
    return torch.logaddexp(x, torch.zeros_like(x)).mean().to(z1.dtype)


def step(z1, z2, scale, backend, both_directions):
    for t in (z1, z2, scale):
        t.grad = None
    loss = clip_from_primitive(z1, z2, scale, backend, both_directions)
    loss.backward()
    return [loss.detach().clone(), z1.grad.clone(), z2.grad.clone(), scale.grad.clone()]


def library_step(z1, z2, scale, backend):
    for t in (z1, z2, scale):
        t.grad = None
    loss = mk.clip_loss(z1, z2, logit_scale=scale, backend=backend)
    loss.backward()
    return [loss.detach().clone(), z1.grad.clone(), z2.grad.clone(), scale.grad.clone()]


def max_rel_diff(results, other):
    return max(((a.double() - b.double()).norm() / b.double().norm()).item()
               for a, b in zip(results, other))


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def inputs(n, d, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    z1, z2 = (torch.nn.functional.normalize(
        torch.randn(n, d, device=device, generator=gen), dim=1).to(dtype).requires_grad_()
        for _ in range(2))
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    return z1, z2, scale


def _int_list(text):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _dtype_list(text):
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if not isinstance(getattr(torch, x, None), torch.dtype)
           or x not in ("float32", "float64", "bfloat16", "float16")]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: choose from float32, float64, bfloat16, float16")
    return names


def dry_run(args) -> int:
    backend = args.backend if mk.available_backends("cpu").get(args.backend) is None \
        else "torch"
    print(f"dry run on the CPU with backend {backend!r}: both paths and clip_loss, N = 64")
    failures = 0
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for d in args.dim:
            z1, z2, scale = inputs(64, d, dtype, "cpu")
            one = step(z1, z2, scale, backend, True)
            two = step(z1, z2, scale, backend, False)
            library = library_step(z1, z2, scale, backend)
            diffs = (max_rel_diff(one, two), max_rel_diff(one, library))
            ok = max(diffs) <= DRY_RUN_RTOL[dtype]
            failures += not ok
            print(f"  D = {d}, {dtype_name}: one tile vs two calls {diffs[0]:.1e}, one tile vs "
                  f"clip_loss {diffs[1]:.1e}{'' if ok else '  <-- disagree'}")
    return 1 if failures else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=_int_list, default=_int_list("2048,4096"))
    p.add_argument("--dim", type=_int_list, default=_int_list("128"))
    p.add_argument("--dtype", type=_dtype_list, default=_dtype_list("float32,bfloat16"))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--backend", default="cuda", choices=("cuda", "triton", "torch", "cpu"),
                   help="the kernel backend both paths call (default cuda)")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: check the arguments and that both paths agree, on the CPU")
    args = p.parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    reason = mk.available_backends(torch.device("cuda")).get(args.backend)
    if reason is not None:
        raise SystemExit(f"the {args.backend} backend is not usable here: {reason}")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| N | D | dtype | two calls ms | one tile ms | ratio | useful GFLOP/s (one tile) "
          "| max rel diff |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for d in args.dim:
            for n in args.n:
                z1, z2, scale = inputs(n, d, dtype, "cuda")
                results, ms = {}, {}
                for name, both in (("two", False), ("one", True)):
                    results[name] = step(z1, z2, scale, args.backend, both)
                    ms[name] = timed(lambda: step(z1, z2, scale, args.backend, both),
                                     args.repeats)
                diff = max_rel_diff(results["one"], results["two"])
                gflops = useful_flops("cross_sym", n, d) / (ms["one"] * 1e-3) / 1e9
                print(f"| {n} | {d} | {dtype_name} | {ms['two']:.3f} | {ms['one']:.3f} | "
                      f"{ms['two'] / ms['one']:.2f} | {gflops:.0f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
