"""SigLIP: macl-kernels' fused loss against OpenCLIP's ``SigLipLoss``, side by side in one run.

    python bench/bench_siglip.py --peer /tmp/peer_openclip                 # N = 4096, 16384
    python bench/bench_siglip.py --peer /tmp/peer_openclip --sizes 512 --repeats 2   # a smoke run
    python bench/bench_siglip.py --peer /tmp/peer_openclip --parity-only   # the float64 table

OpenCLIP is not a dependency of this package: install it into a private directory without its
dependencies (``pip install --no-deps --target /tmp/peer_openclip open_clip_torch``) and pass that
directory as ``--peer``. Only its ``open_clip/loss.py`` is loaded (by path: the package's
``__init__`` would import its model zoo and their dependencies).

1. **Time and memory.** For each ``N`` (rows of images and of texts), ``D`` and float32: one
   forward+backward of the mean loss with gradients for both feature matrices, the scale and the
   bias (``t = 10``, ``b = -10``, OpenCLIP's SigLIP initialisation), features L2-normalised
   beforehand (``SigLipLoss`` does not normalise), ``validate=False`` for ours. Each
   (implementation, N) runs in a fresh worker process: the peak extra memory is the peak RSS
   (``VmHWM``, reset through ``/proc/self/clear_refs``) during one step minus the RSS before it;
   the time is the median of ``--repeats`` further steps after one warm-up step. Peak RSS moves
   by several MiB between processes (allocator and thread start-up), so ``--memory-runs`` more
   fresh workers measure the memory step alone: the table gives the median over all runs and the
   range, and the memory ratio is given both from the medians and as the worst case (our
   largest over the peer's smallest). The useful work
   is ``3 N^2 D`` multiply-adds (docs/math.md, roofline); the matmul rate is ``torch.mm`` of
   ``[N, D] x [D, N]`` into a preallocated output, measured in its own worker.
2. **Parity** (``--parity``, or ``--parity-only``): float64 values and the gradients of image and
   text features, scale and bias of every backend usable here against OpenCLIP's ``SigLipLoss``
   itself, as max relative errors.

Prints what it measured, on which machine, with how many threads; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def load_openclip_loss(peer: str):
    """``open_clip/loss.py`` from the directory ``peer`` as a module (by path)."""
    path = os.path.join(peer, "open_clip", "loss.py")
    if not os.path.exists(path):
        raise SystemExit(f"no OpenCLIP under {peer!r} (expected {path}); install it with "
                         f"`pip install --no-deps --target {peer} open_clip_torch`")
    spec = importlib.util.spec_from_file_location("openclip_loss_peer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(n: int, d: int, dtype, seed: int = 0):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    txt = F.normalize(img + 0.8 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    bias = torch.tensor(-10.0, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (img, txt, scale, bias)]


def make_loss(impl: str, peer: str):
    """``fn(img, txt, scale, bias) -> loss``: ``openclip`` or ``macl-<backend>``."""
    if impl == "openclip":
        criterion = load_openclip_loss(peer).SigLipLoss()
        return lambda img, txt, s, b: criterion(img, txt, s, b)
    import macl_kernels as mk

    backend = impl.split("-", 1)[1]
    return lambda img, txt, s, b: mk.siglip_loss(img, txt, s, b, normalize=False,
                                                 backend=backend, validate=False)


# --------------------------------------------------------------------------------------------
# Worker: one implementation at one size, in a fresh process
# --------------------------------------------------------------------------------------------


def worker(impl: str, n: int, d: int, repeats: int, peer: str) -> dict:
    import gc

    import numpy as np
    import torch

    from macl_kernels.tools.worker import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    if impl == "matmul":
        from macl_kernels.tools.roofline import measure_matmul

        return {"ok": True, **measure_matmul(n, n, d, torch.float32)}
    fn = make_loss(impl, peer)
    leaves = inputs(n, d, torch.float32)

    def step():
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves).backward()

    warm = inputs(64, d, torch.float32, seed=1)
    fn(*warm).backward()  # first-call costs (extension load, allocator) outside the measurement
    gc.collect()
    was_reset = reset_peak_rss()
    before = current_rss_bytes()
    step()
    peak, method = peak_rss_bytes()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"ok": True, "median_s": float(np.median(times)) if times else None, "times_s": times,
            "peak_extra_bytes": max(0, peak - before),
            "memory_method": method + ("" if was_reset else " (not reset)"),
            "torch_threads": torch.get_num_threads()}


def run_worker(impl: str, n: int, d: int, repeats: int, peer: str, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--sizes", str(n),
           "--dim", str(d), "--repeats", str(repeats), "--peer", peer]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:g} s"}
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr.strip().splitlines()[-1][:200]
                if proc.stderr.strip() else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Parity in float64
# --------------------------------------------------------------------------------------------


def parity(peer: str, n: int = 64, d: int = 32) -> list:
    import torch

    import macl_kernels as mk

    def four(fn, device="cpu"):
        leaves = inputs(n, d, torch.float64, seed=3)
        leaves = [x.detach().to(device).requires_grad_() if i < 2 else x
                  for i, x in enumerate(leaves)]
        loss = fn(*leaves)
        return [t.detach().cpu() for t in (loss, *torch.autograd.grad(loss, leaves))]

    want = four(make_loss("openclip", peer))
    rows = []
    for backend, reason in mk.available_backends().items():
        if reason is not None:
            rows.append({"backend": backend, "skipped": reason})
            continue
        device = "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
        got = four(make_loss(f"macl-{backend}", peer), device)
        errs = [float((g - w).norm() / w.norm()) for g, w in zip(got, want)]
        rows.append({"backend": backend, "N": n, "D": d, **dict(zip(
            ["loss", "d_image", "d_text", "d_scale", "d_bias"], errs))})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", required=True, help="directory holding open_clip/loss.py")
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backend", default="cpu", help="our backend to time (default cpu)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    p.add_argument("--memory-runs", type=int, default=3,
                   help="further fresh workers per (implementation, N) that measure memory only")
    p.add_argument("--parity", action="store_true", help="also print the float64 parity table")
    p.add_argument("--parity-only", action="store_true")
    p.add_argument("--json", help="write the measured rows to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes[0], args.dim, args.repeats, args.peer)))
        return 0

    import numpy as np
    import torch

    out = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
           "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "rows": [], "parity": []}
    print(f"SigLIP forward+backward, float32, D = {args.dim}, mean loss, gradients of image, "
          f"text, scale and bias; {out['machine']}, {out['cpu_count']} CPUs, torch "
          f"{out['torch']}, {out['torch_threads']} threads; median of {args.repeats} steps, "
          f"peak extra RSS of one step, each in a fresh process ({1 + args.memory_runs} "
          f"processes per cell: median and range)")
    if not args.parity_only:
        ours = f"macl-{args.backend}"
        header = (f"{'N':>6}  {'implementation':<16} {'median s':>9} {'peak extra MiB':>15} "
                  f"{'(range)':>13} {'useful GFLOP/s':>15} {'of matmul':>9}")
        print(header)
        print("-" * len(header))
        for n in args.sizes:
            useful_flops = 2.0 * 3.0 * n * n * args.dim  # 3 N^2 D multiply-adds
            matmul = run_worker("matmul", n, args.dim, 1, args.peer, args.timeout)
            results = {impl: run_worker(impl, n, args.dim, args.repeats, args.peer, args.timeout)
                       for impl in (ours, "openclip")}
            for impl, r in results.items():
                peaks = [r["peak_extra_bytes"]] if r.get("ok") else []
                for _ in range(args.memory_runs):
                    m = run_worker(impl, n, args.dim, 0, args.peer, args.timeout)
                    if m.get("ok"):
                        peaks.append(m["peak_extra_bytes"])
                r["peak_extra_bytes_runs"] = peaks
                if peaks:
                    r["peak_extra_bytes_median"] = float(np.median(peaks))
            for impl, r in results.items():
                row = {"N": n, "D": args.dim, "implementation": impl, **r,
                       "matmul_gflops": matmul.get("gflops")}
                out["rows"].append(row)
                if not r.get("ok"):
                    print(f"{n:>6}  {impl:<16} failed: {r.get('error')}")
                    continue
                rate = useful_flops / r["median_s"] / 1e9
                frac = rate / matmul["gflops"] if matmul.get("ok") else float("nan")
                peaks = r["peak_extra_bytes_runs"]
                span = f"{min(peaks) / 2**20:.1f}-{max(peaks) / 2**20:.1f}"
                print(f"{n:>6}  {impl:<16} {r['median_s']:>9.4f} "
                      f"{r['peak_extra_bytes_median'] / 2**20:>15.1f} {span:>13} {rate:>15.1f} "
                      f"{frac:>9.2f}")
            a, b = results[ours], results["openclip"]
            if a.get("ok") and b.get("ok"):
                worst = max(a["peak_extra_bytes_runs"]) / max(1, min(b["peak_extra_bytes_runs"]))
                print(f"{n:>6}  {ours} vs OpenCLIP: {b['median_s'] / a['median_s']:.2f}x faster, "
                      f"{a['peak_extra_bytes_median'] / max(1, b['peak_extra_bytes_median']):.4f}"
                      f" of its extra memory (medians; worst case {worst:.4f}); matmul "
                      f"[{n}, {args.dim}] x [{args.dim}, {n}]: "
                      f"{matmul.get('gflops', float('nan')):.1f} GFLOP/s")
    if args.parity or args.parity_only:
        print("\nfloat64 parity with OpenCLIP's SigLipLoss (relative errors; N = 64, D = 32, "
              "t = 10, b = -10)")
        for row in parity(args.peer):
            out["parity"].append(row)
            if "skipped" in row:
                print(f"  {row['backend']:<9} not usable here: {row['skipped'][:80]}")
            else:
                print(f"  {row['backend']:<9} loss {row['loss']:.1e}  d image "
                      f"{row['d_image']:.1e}  d text {row['d_text']:.1e}  d scale "
                      f"{row['d_scale']:.1e}  d bias {row['d_bias']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
