"""CLIP on the cuda backend: both directions from one tile (``both_forward_kernel`` /
``both_backward_kernel``) against the two plain calls it replaces (``_ops``' fallback, forced by
setting ``Backend.both_directions`` false), side by side in one process on one GPU.

Reports per (N, D, dtype): the median forward+backward time of each path (CUDA events), their
ratio, the one-tile path's useful GFLOP/s (``macl_kernels.tools.roofline.useful_flops``: CLIP's
4 N^2 D multiply-adds per step, docs/math.md#roofline-useful-work-and-the-matmul-rate) and the
largest relative difference (norm-wise) of the loss and gradients between the two paths. Needs a
CUDA GPU and the built extension.

    python bench/gpu/cuda_clip_both_directions.py --n 2048,4096,8192 --dim 128,512 \
        --dtype float32,bfloat16 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics

import torch

import macl_kernels as mk
from macl_kernels.tools.roofline import useful_flops
from macl_kernels.primitive.backends import kernel_backend


def step(z1, z2, scale):
    for t in (z1, z2, scale):
        t.grad = None
    loss = mk.clip_loss(z1, z2, logit_scale=scale, backend="cuda")
    loss.backward()
    return [loss.detach().clone(), z1.grad.clone(), z2.grad.clone(), scale.grad.clone()]


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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="2048,4096")
    p.add_argument("--dim", default="128")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    reason = mk.available_backends().get("cuda")
    if reason is not None:
        raise SystemExit(f"the cuda backend is not usable here: {reason}")
    backend = kernel_backend("cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| N | D | dtype | two calls ms | one tile ms | ratio | useful GFLOP/s (one tile) "
          "| max rel diff |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for dtype_name in args.dtype.split(","):
        dtype = getattr(torch, dtype_name)
        for d in (int(x) for x in args.dim.split(",")):
            for n in (int(x) for x in args.n.split(",")):
                gen = torch.Generator(device="cuda").manual_seed(0)
                z1, z2 = (torch.nn.functional.normalize(
                    torch.randn(n, d, device="cuda", generator=gen), dim=1).to(dtype)
                    .requires_grad_() for _ in range(2))
                scale = torch.tensor(1 / 0.07, device="cuda", requires_grad=True)
                results, ms = {}, {}
                for name, flag in (("two", False), ("one", True)):
                    backend.both_directions = flag
                    try:
                        results[name] = step(z1, z2, scale)
                        ms[name] = timed(lambda: step(z1, z2, scale), args.repeats)
                    finally:
                        backend.both_directions = True
                diff = max(((a.double() - b.double()).norm() / b.double().norm()).item()
                           for a, b in zip(results["one"], results["two"]))
                gflops = useful_flops("cross_sym", n, d) / (ms["one"] * 1e-3) / 1e9
                print(f"| {n} | {d} | {dtype_name} | {ms['two']:.3f} | {ms['one']:.3f} | "
                      f"{ms['two'] / ms['one']:.2f} | {gflops:.0f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
