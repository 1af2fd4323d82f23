"""Contrastive training with batches larger than memory: gradient caching (``--cache-chunk``).

    python python/train_large_batch.py --batch-size 4096 --steps 5                    # plain
    python python/train_large_batch.py --batch-size 4096 --steps 5 --cache-chunk 512  # cached
    python python/train_large_batch.py --measure --sizes 1024,4096,16384 --out DIR    # side by side
    python python/train_large_batch.py --search plain --budget-gb 8 --out DIR         # largest batch
    python python/train_large_batch.py --search cached --budget-gb 8 --out DIR
    python python/train_large_batch.py --report --out DIR     # tables + plot from DIR's CSVs
    python python/train_large_batch.py --exactness --out DIR  # GradCache vs reference, every loss

**Data.** scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn) are far too few
for batches of 16k: every step samples ``--batch-size`` images *with replacement* and draws two
random views of each on the fly (random affine: rotation, scale, shift; rendered at 32 x 32 by
``grid_sample``; contrast/brightness jitter; Gaussian noise). Nothing is downloaded.

**Encoder.** A small convolutional net chosen so that its *activations* dominate a step's memory
(about half a MiB per view at 32 x 32, against 100k parameters and ``O(N D)`` for the loss):
five 3x3 convolutions (16, 16 | pool | 32, 32 | pool | 64 channels), each followed by GroupNorm
(8 groups) and GELU, channels-last (oneDNN's fast layout on CPU), global average pooling, dropout
0.1 and a linear head to 128-d. No BatchNorm: its batch statistics would differ between a chunk
and the batch (``GradCache`` refuses it unless told otherwise).

**Step.** Plain: ``loss(encoder(view1), encoder(view2)).backward()``, the activations of all
``2 N`` views alive at once. Cached (``--cache-chunk C``): ``macl_kernels.GradCache`` embeds the
views ``C`` at a time without a graph, computes the loss of the whole batch and its gradient
with respect to the embeddings, then re-runs the encoder ``C`` rows at a time with the dropout
masks replayed and back-propagates those gradients: the same gradient, with the activations of
``C`` rows. The loss is ``MACLLoss`` (layout ``2n``) on the fused backend (``auto``).

**Measurements.** Each (batch, method) runs in a fresh process (peak memory is per process): a
warm-up step at batch 256, then ``--repeats`` timed training steps (zero_grad, the step, SGD);
``peak`` is the process's peak RSS during the timed steps minus its RSS before the batch was
drawn (so it counts the views, activations, embeddings, loss and gradients). A probe is capped
at its baseline plus 1.25 x the budget (``RLIMIT_AS``) so that a batch far over budget fails
cleanly instead of pressing the machine. ``--search`` doubles the batch from the largest one
known to fit until a step exceeds the budget, fails, or a probe runs past ``--probe-timeout``
(the time cap), then bisects to ``--resolution``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:
    import macl_kernels as mk
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import macl_kernels as mk

GIB = 2 ** 30
MIB = 2 ** 20
IMAGE = 32
WARMUP_BATCH = 256


# --- data ---------------------------------------------------------------------------------------

def load_digits_images() -> torch.Tensor:
    """The 1,797 digits as ``[n, 1, 8, 8]`` float32 in ``[0, 1]`` (ships with scikit-learn)."""
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)[:, None]


def augmented_views(images: torch.Tensor, batch: int, generator: torch.Generator):
    """Two random views of ``batch`` images drawn with replacement, ``[batch, 1, 32, 32]`` each,
    channels-last."""
    idx = torch.randint(len(images), (batch,), generator=generator)
    src = images[idx]

    def view():
        angle = (torch.rand(batch, generator=generator) - 0.5) * (2 * math.pi / 12)  # +-15 deg
        scale = 1 + (torch.rand(batch, generator=generator) - 0.5) * 0.2
        shift = (torch.rand(batch, 2, generator=generator) - 0.5) * 0.25
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                             torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, (batch, 1, IMAGE, IMAGE), align_corners=False)
        out = F.grid_sample(src, grid, align_corners=False, padding_mode="zeros")
        contrast = 1 + (torch.rand(batch, 1, 1, 1, generator=generator) - 0.5) * 0.4
        bright = (torch.rand(batch, 1, 1, 1, generator=generator) - 0.5) * 0.2
        out = out * contrast + bright + 0.05 * torch.randn(out.shape, generator=generator)
        return out.contiguous(memory_format=torch.channels_last)

    return view(), view()


# --- model --------------------------------------------------------------------------------------

def _conv_block(cin: int, cout: int) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.GELU()]


def make_encoder(embed_dim: int = 128, dropout: float = 0.1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        *_conv_block(1, 16), *_conv_block(16, 16), nn.AvgPool2d(2),
        *_conv_block(16, 32), *_conv_block(32, 32), nn.AvgPool2d(2),
        *_conv_block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(dropout), nn.Linear(64, embed_dim),
    )
    return model.to(memory_format=torch.channels_last)


# --- one process: train, or measure one (batch, method) -------------------------------------------

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cap_address_space(budget_bytes: int) -> None:
    """Fail an allocation beyond baseline + 1.25 x budget here, not by pressing the machine."""
    import resource

    with open("/proc/self/status") as f:
        vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm_size + int(1.25 * budget_bytes) + 512 * MIB
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


class Trainer:
    def __init__(self, args):
        self.args = args
        self.images = load_digits_images()
        self.encoder = make_encoder(dropout=args.dropout, seed=args.seed)
        self.criterion = mk.MACLLoss(backend=args.backend) if args.loss == "macl" else \
            functools.partial({"infonce": mk.infonce_loss, "dcl": mk.dcl_loss,
                               "tfree": mk.tfree_loss}[args.loss], backend=args.backend)
        self.opt = torch.optim.SGD(self.encoder.parameters(), lr=args.lr, momentum=0.9)
        self.cache = (mk.GradCache(self.criterion, self.encoder, chunk_size=args.cache_chunk)
                      if args.cache_chunk else None)
        self.gen = torch.Generator().manual_seed(args.seed)

    def step(self, v1: torch.Tensor, v2: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        if self.cache is not None:
            loss = self.cache.step(v1, v2)
        else:
            loss = self.criterion(self.encoder(v1), self.encoder(v2))
            loss.backward()
            loss = loss.detach()
        self.opt.step()
        return float(loss)

    def views(self, batch: int):
        return augmented_views(self.images, batch, self.gen)


def measure_one(args) -> Dict:
    """One (batch, method) in this process: warm-up, then ``repeats`` timed steps."""
    trainer = Trainer(args)
    trainer.step(*trainer.views(WARMUP_BATCH))
    if args.budget_gb:
        _cap_address_space(int(args.budget_gb * GIB))
    base = _rss()
    _reset_peak()
    times, loss = [], float("nan")
    try:
        for _ in range(args.repeats):
            v1, v2 = trainer.views(args.batch_size)
            t0 = time.perf_counter()
            loss = trainer.step(v1, v2)
            times.append(time.perf_counter() - t0)
            del v1, v2
        error = ""
    except (RuntimeError, MemoryError) as exc:  # the address-space cap: out of memory
        error = f"allocation failed ({str(exc).splitlines()[0][:120]})"
    peak = _peak() - base
    return {"N": args.batch_size, "method": "cached" if args.cache_chunk else "plain",
            "chunk": args.cache_chunk, "step_s": float(np.median(times)) if times else None,
            "peak_bytes": peak, "loss": loss, "error": error,
            "threads": torch.get_num_threads()}


def train(args) -> None:
    trainer = Trainer(args)
    method = f"cached (chunk {args.cache_chunk})" if args.cache_chunk else "plain"
    print(f"{args.loss} on augmented digits, batch {args.batch_size} pairs, {method}")
    base = _rss()
    _reset_peak()
    for step in range(args.steps):
        v1, v2 = trainer.views(args.batch_size)
        t0 = time.perf_counter()
        loss = trainer.step(v1, v2)
        print(f"step {step}: loss {loss:.4f}  {time.perf_counter() - t0:.2f} s  "
              f"peak {(_peak() - base) / MIB:.0f} MiB")


# --- several processes: the side-by-side table and the largest batch -----------------------------

def _worker_cmd(args, n: int, chunk: int, repeats: int, budget: float) -> List[str]:
    return [sys.executable, os.path.abspath(__file__), "--worker", "--batch-size", str(n),
            "--cache-chunk", str(chunk), "--repeats", str(repeats), "--budget-gb", str(budget),
            "--threads", str(args.threads), "--loss", args.loss, "--backend", args.backend,
            "--seed", str(args.seed), "--dropout", str(args.dropout)]


def run_worker(args, n: int, chunk: int, repeats: int, timeout: float) -> Dict:
    t0 = time.time()
    try:
        proc = subprocess.run(_worker_cmd(args, n, chunk, repeats, args.budget_gb),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"N": n, "method": "cached" if chunk else "plain", "chunk": chunk, "step_s": None,
                "peak_bytes": None, "loss": None, "error": f"time cap ({timeout:.0f} s)",
                "wall_s": time.time() - t0}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"N": n, "method": "cached" if chunk else "plain", "chunk": chunk, "step_s": None,
                "peak_bytes": None, "loss": None,
                "error": f"exit {proc.returncode}: {tail[0][:160]}", "wall_s": time.time() - t0}
    out = json.loads(lines[-1])
    out["wall_s"] = time.time() - t0
    return out


TABLE_COLUMNS = ["N", "method", "chunk", "step_s", "peak_bytes", "loss", "error", "wall_s"]


def _write_csv(path: str, rows: List[Dict], columns: List[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _read_csv(path: str) -> List[Dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["N"] = int(r["N"])
        r["chunk"] = int(r["chunk"]) if r.get("chunk") else 0
        for k in ("step_s", "peak_bytes", "loss", "wall_s"):
            r[k] = float(r[k]) if r.get(k) not in (None, "", "None") else None
    return rows


def _fits(r: Dict, budget: int) -> bool:
    return not r["error"] and r["peak_bytes"] is not None and r["peak_bytes"] <= budget


def measure_table(args) -> None:
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for chunk in (0, args.chunk):  # side by side: plain then cached, each a fresh process
            r = run_worker(args, n, chunk, args.repeats, args.probe_timeout)
            rows.append(r)
            print(_fmt_row(r), flush=True)
    _write_csv(os.path.join(args.out, "table.csv"), rows, TABLE_COLUMNS)


def _fmt_row(r: Dict) -> str:
    peak = f"{r['peak_bytes'] / MIB:.0f} MiB" if r.get("peak_bytes") is not None else "-"
    step = f"{r['step_s']:.2f} s" if r.get("step_s") is not None else "-"
    return f"N={r['N']:>6} {r['method']:<6} step {step:>9}  peak {peak:>10}  {r.get('error') or ''}"


def search(args) -> None:
    """Largest batch under the budget for one method: doubling from the largest known fit, then
    bisection; every probe a fresh process with a time cap."""
    budget = int(args.budget_gb * GIB)
    chunk = args.chunk if args.search == "cached" else 0
    known = [r for r in _read_csv(os.path.join(args.out, "table.csv"))
             if r["method"] == args.search]
    probes: List[Dict] = []
    t_start = time.time()

    def probe(n: int) -> Optional[bool]:
        for r in known + probes:
            if r["N"] == n:
                return _fits(r, budget)
        if time.time() - t_start > args.search_time:
            return None
        r = run_worker(args, n, chunk, 1, args.probe_timeout)
        probes.append(r)
        print(_fmt_row(r), flush=True)
        if r["error"].startswith("time cap"):
            return None
        return _fits(r, budget)

    fit = max([r["N"] for r in known if _fits(r, budget)] or [args.resolution])
    miss, capped = None, False
    n = fit
    while miss is None:
        ok = probe(n)
        if ok is None:
            capped = True
            break
        if ok:
            fit = max(fit, n)
            if n >= args.search_max:
                capped = True
                break
            n *= 2
        else:
            miss = n
    while miss is not None and miss - fit > args.resolution:
        mid = (fit + miss) // 2 // args.resolution * args.resolution
        if mid <= fit:
            break
        ok = probe(mid)
        if ok is None:
            capped = True
            break
        if ok:
            fit = mid
        else:
            miss = mid
    fit_row = next((r for r in known + probes if r["N"] == fit and _fits(r, budget)), None)
    miss_row = next((r for r in known + probes if r["N"] == miss), None) if miss else None
    result = {
        "method": args.search, "chunk": chunk, "budget_gb": args.budget_gb, "largest_N": fit,
        "peak_bytes_at_largest": fit_row["peak_bytes"] if fit_row else None,
        "step_s_at_largest": fit_row["step_s"] if fit_row else None,
        "first_miss_N": miss, "first_miss": (miss_row["error"] or
                                            f"{miss_row['peak_bytes'] / GIB:.2f} GiB measured")
        if miss_row else "",
        "stopped_by": "time cap" if capped and miss is None else ("resolution" if miss else "cap"),
        "search_s": round(time.time() - t_start, 1),
    }
    _write_csv(os.path.join(args.out, f"probes_{args.search}.csv"), probes, TABLE_COLUMNS)
    with open(os.path.join(args.out, f"capacity_{args.search}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"largest batch under {args.budget_gb} GiB, {args.search}: N = {fit}"
          + (f" (stopped by the time cap; next probe N = {n})" if capped else
             f" (N = {miss}: {result['first_miss']})"))


def report(args) -> None:
    """Markdown tables (side by side; the largest batch per method) and the plot."""
    table = _read_csv(os.path.join(args.out, "table.csv"))
    by = {(r["N"], r["method"]): r for r in table}
    sizes = sorted({r["N"] for r in table})

    def cell(r):
        if r is None:
            return "-", "-"
        step = f"{r['step_s']:.2f}" if r["step_s"] is not None else "-"
        peak = f"{r['peak_bytes'] / GIB:.2f}" if r["peak_bytes"] is not None else "-"
        if r["error"]:
            peak = f"> {args.budget_gb * 1.25:.0f} ({r['error'].split(' (')[0]})" \
                if r["error"].startswith("allocation") else r["error"]
        return step, peak

    lines = ["| N (pairs) | plain step s | cached step s | time ratio | plain peak GiB | "
             "cached peak GiB | memory ratio |", "|---|---|---|---|---|---|---|"]
    for n in sizes:
        p, c = by.get((n, "plain")), by.get((n, "cached"))
        (ps, pp), (cs, cp) = cell(p), cell(c)
        tr = (f"{c['step_s'] / p['step_s']:.2f}x" if p and c and p["step_s"] and c["step_s"]
              else "-")
        mr = (f"{p['peak_bytes'] / c['peak_bytes']:.1f}x less" if p and c and not p["error"]
              and not c["error"] and p["peak_bytes"] and c["peak_bytes"] else "-")
        lines.append(f"| {n} | {ps} | {cs} | {tr} | {pp} | {cp} | {mr} |")
    caps = []
    for method in ("plain", "cached"):
        path = os.path.join(args.out, f"capacity_{method}.json")
        if os.path.exists(path):
            with open(path) as f:
                caps.append(json.load(f))
    if caps:
        lines += ["", f"| method | largest N under {args.budget_gb:g} GiB | peak there | "
                      "step there | first miss | stopped by |", "|---|---|---|---|---|---|"]
        for c in caps:
            peak = f"{c['peak_bytes_at_largest'] / GIB:.2f} GiB" \
                if c["peak_bytes_at_largest"] else "-"
            step = f"{c['step_s_at_largest']:.1f} s" if c["step_s_at_largest"] else "-"
            miss = f"N = {c['first_miss_N']}: {c['first_miss']}" if c["first_miss_N"] else "-"
            name = c["method"] + (f" (chunk {c['chunk']})" if c["chunk"] else "")
            lines.append(f"| {name} | {c['largest_N']} | {peak} | {step} | {miss} | "
                         f"{c['stopped_by']} |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write(text + "\n")
    _plot(args, table)


def _plot(args, table: List[Dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(table)
    for method in ("plain", "cached"):
        rows += _read_csv(os.path.join(args.out, f"probes_{method}.csv"))
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, color in (("plain", "tab:red"), ("cached", "tab:blue")):
        ok = sorted({r["N"]: r for r in rows if r["method"] == method and not r["error"]
                     and r["peak_bytes"] is not None}.values(), key=lambda r: r["N"])
        bad = [r for r in rows if r["method"] == method and r["error"]]
        label = method if method == "plain" else f"cached (chunk {args.chunk})"
        ax_m.plot([r["N"] for r in ok], [r["peak_bytes"] / GIB for r in ok], "o-", color=color,
                  label=label)
        for r in bad:
            ax_m.plot([r["N"]], [args.budget_gb * 1.25], "x", color=color, markersize=9)
        timed = [r for r in ok if r["step_s"] is not None]
        ax_t.plot([r["N"] for r in timed], [r["step_s"] for r in timed], "o-", color=color,
                  label=label)
    ax_m.axhline(args.budget_gb, color="gray", ls="--", lw=1, label=f"{args.budget_gb:g} GiB budget")
    ax_m.set(xscale="log", yscale="log", xlabel="batch N (pairs; 2N views)",
             ylabel="peak memory of a step (GiB)",
             title="memory (x: allocation failed at the cap)")
    ax_t.set(xscale="log", yscale="log", xlabel="batch N (pairs; 2N views)",
             ylabel="time per training step (s)", title="time")
    for ax in (ax_m, ax_t):
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"SimCLR step, MACL loss, conv encoder with GroupNorm, "
                 f"{args.threads} CPU threads ({platform.machine()})")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "grad_cache.png"), dpi=110)


# --- exactness table ----------------------------------------------------------------------------

def exactness(args) -> None:
    """GradCache against a reference step that keeps the graph over the same chunks and random
    state (with dropout), and against one plain big-batch step (without dropout); every loss,
    one shared encoder and two towers, float64 and float32. Max relative error over every
    parameter gradient (and CLIP's learnable scale)."""
    torch.set_num_threads(1)
    n, d_in, chunk = 24, 10, 7

    def encoder(seed, dropout, dtype):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d_in, 32), nn.LayerNorm(32), nn.GELU(),
                             nn.Dropout(0.3 if dropout else 0.0), nn.Linear(32, 16)).to(dtype)

    def losses(backend, log_scale):
        return {
            "macl": functools.partial(mk.macl_loss, backend=backend),
            "infonce": functools.partial(mk.infonce_loss, backend=backend),
            "clip": lambda a, b: mk.clip_loss(a, b, log_scale.exp(), backend=backend),
            "dcl": functools.partial(mk.dcl_loss, backend=backend),
            "dclw": functools.partial(mk.dcl_loss, weighted=True, backend=backend),
            "tfree": functools.partial(mk.tfree_loss, backend=backend),
            "MACLLoss": mk.MACLLoss(backend=backend),
            "NTXentLoss": mk.NTXentLoss(backend=backend),
            "DCLLoss": mk.DCLLoss(backend=backend),
            "DCLWLoss": mk.DCLWLoss(backend=backend),
            "ClipLoss": lambda a, b: mk.ClipLoss(backend=backend)(a, b, log_scale.exp()),
        }

    def run(loss, two, dropout, dtype, backend, how):
        g = torch.Generator().manual_seed(3)
        x1 = torch.randn(n, d_in, generator=g, dtype=torch.float64).to(dtype)
        x2 = (x1 + 0.3 * torch.randn(n, d_in, generator=g, dtype=torch.float64)).to(dtype)
        e1 = encoder(0, dropout, dtype)
        e2 = encoder(1, dropout, dtype) if two else e1
        log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=dtype))
        fn = losses(backend, log_scale)[loss]
        torch.manual_seed(42)
        if how == "cached":
            mk.GradCache(fn, e1, e2 if two else None, chunk_size=chunk).step(x1, x2)
        elif how == "chunked":
            fn(torch.cat([e1(c) for c in x1.split(chunk)]),
               torch.cat([e2(c) for c in x2.split(chunk)])).backward()
        else:
            fn(e1(x1), e2(x2)).backward()
        params = list(e1.parameters()) + (list(e2.parameters()) if two else [])
        if log_scale.grad is not None:
            params.append(log_scale)
        return [p.grad.detach().double() for p in params]

    def err(a, b):
        return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))

    backend = args.backend if args.backend != "auto" else "torch"
    rows = []
    names = list(losses(backend, nn.Parameter(torch.tensor(1.0))))
    for loss in names:
        row = {"loss": loss}
        for two in (False, True):
            enc = "two" if two else "shared"
            for dtype, tag in ((torch.float64, "f64"), (torch.float32, "f32")):
                row[f"{enc}_{tag}_dropout_vs_chunked"] = err(
                    run(loss, two, True, dtype, backend, "cached"),
                    run(loss, two, True, dtype, backend, "chunked"))
                row[f"{enc}_{tag}_vs_plain"] = err(
                    run(loss, two, False, dtype, backend, "cached"),
                    run(loss, two, False, dtype, backend, "plain"))
        rows.append(row)
    cols = list(rows[0])
    _write_csv(os.path.join(args.out, "exactness.csv"), rows, cols)
    head = ("| loss | shared f64, dropout vs chunked reference | shared f64 vs plain | "
            "shared f32, dropout vs chunked | shared f32 vs plain | two towers f64, dropout vs "
            "chunked | two f64 vs plain | two f32, dropout vs chunked | two f32 vs plain |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append("| " + r["loss"] + " | " + " | ".join(
            f"{r[c]:.1e}" for c in (
                "shared_f64_dropout_vs_chunked", "shared_f64_vs_plain",
                "shared_f32_dropout_vs_chunked", "shared_f32_vs_plain",
                "two_f64_dropout_vs_chunked", "two_f64_vs_plain",
                "two_f32_dropout_vs_chunked", "two_f32_vs_plain")) + " |")
    worst64 = max(v for r in rows for k, v in r.items() if "f64" in k)
    worst32 = max(v for r in rows for k, v in r.items() if "f32" in k)
    lines.append("")
    lines.append(f"backend `{backend}`, N = {n} pairs in chunks of {chunk}; worst float64 "
                 f"{worst64:.1e} (bound 1e-10), worst float32 {worst32:.1e} (bound 1e-5)")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "exactness.md"), "w") as f:
        f.write(text + "\n")
    if worst64 > 1e-10 or worst32 > 1e-5:
        raise SystemExit("exactness bound exceeded")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=4096, help="pairs per step (2N views)")
    p.add_argument("--cache-chunk", type=int, default=0,
                   help="gradient caching with this many rows per forward (0: plain training)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--loss", default="macl", choices=["macl", "infonce", "dcl", "tfree"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/grad_cache")
    p.add_argument("--measure", action="store_true", help="plain vs cached at --sizes")
    p.add_argument("--sizes", default="1024,4096,16384")
    p.add_argument("--chunk", type=int, default=1024, help="chunk of the cached measurements")
    p.add_argument("--repeats", type=int, default=1, help="timed steps per measurement")
    p.add_argument("--search", choices=["plain", "cached"],
                   help="largest batch under --budget-gb for one method")
    p.add_argument("--budget-gb", type=float, default=8.0)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--search-max", type=int, default=1 << 20)
    p.add_argument("--search-time", type=float, default=420.0,
                   help="no new probe after this many seconds of a search")
    p.add_argument("--probe-timeout", type=float, default=300.0,
                   help="a probe running longer is stopped: the time cap")
    p.add_argument("--report", action="store_true")
    p.add_argument("--exactness", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure_one(args)))
        return 0
    if args.measure or args.search or args.report or args.exactness:
        os.makedirs(args.out, exist_ok=True)
    if args.exactness:
        exactness(args)
    if args.measure:
        measure_table(args)
    if args.search:
        search(args)
    if args.report:
        report(args)
    if not (args.measure or args.search or args.report or args.exactness):
        train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
