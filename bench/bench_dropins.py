"""Drop-ins side by side with their peers, in one process: time and peak extra memory.

1. Memory bank: ``NTXentLoss(memory_bank_size=(Q, D))`` of macl-kernels (every usable backend)
   against lightly's ``NTXentLoss`` with the same bank, one training step (forward, backward,
   enqueue) at batch N, bank Q x D. Default: N = 256, Q = 65536, D = 128, float32.
2. Hard negatives: ``infonce_loss(anchors, positives, layout="cross", temperature=1/scale,
   negatives=hard)`` against the formula of sentence-transformers' MultipleNegativesRankingLoss
   (cosine scores against [positives; hard negatives] times scale, cross-entropy), N = 4096 pairs
   with h = 1 hard negative each, D = 128, float32; also the largest loss/gradient difference.

lightly is imported if it is on the path (``pip install --no-deps --target DIR lightly`` and
``PYTHONPATH=DIR``; its package ``__init__`` needs torchvision, so the loss modules are loaded
without it); otherwise a literal transcription of its bank branch is timed and the table says so.

Peak extra memory: on CUDA ``torch.cuda.max_memory_allocated`` above the memory held before the
step (inputs, bank); on CPU the process's peak resident set above the resident set before the step
(Linux: the peak is reset through ``/proc/self/clear_refs`` and freed heap is returned with
``malloc_trim`` before every measurement; elsewhere it reads "n/a"). Nothing here asserts a time.

    PYTHONPATH=.:/tmp/peer_lightly python bench/bench_dropins.py --out bench/results/dropins
    python bench/bench_dropins.py --small --out /tmp/dropins     # a quick check of the script
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import importlib.util
import os
import platform
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

try:
    import macl_kernels as mk
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import macl_kernels as mk


# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------


def lightly_ntxent_class():
    """lightly's NTXentLoss class and where it came from, or a transcription of its bank branch."""
    spec = importlib.util.find_spec("lightly")
    if spec is not None and spec.origin:
        try:
            root = os.path.dirname(spec.origin)
            if "lightly" not in sys.modules:  # skip the package __init__ (torchvision etc.)
                pkg = types.ModuleType("lightly")
                pkg.__path__ = [root]
                sys.modules["lightly"] = pkg
                for sub in ("loss", "utils", "models", "models.modules"):
                    m = types.ModuleType(f"lightly.{sub}")
                    m.__path__ = [os.path.join(root, *sub.split("."))]
                    sys.modules[f"lightly.{sub}"] = m
                utils = types.ModuleType("lightly.models.utils")
                sys.modules["lightly.models.utils"] = utils
                sys.modules["lightly.models"].utils = utils
            from lightly.loss.ntx_ent_loss import NTXentLoss
            return NTXentLoss, f"lightly {_version('lightly')}"
        except Exception as exc:  # noqa: BLE001 - report and fall back
            print(f"lightly not importable ({exc!r}): timing a transcription", file=sys.stderr)
    return TranscribedLightlyBank, "lightly (transcription: not installed)"


def _version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


class TranscribedLightlyBank(torch.nn.Module):
    """What lightly's NTXentLoss does with a bank, step for step (clone, logits, enqueue)."""

    def __init__(self, temperature, memory_bank_size):
        super().__init__()
        self.temperature = temperature
        self.register_buffer("bank", F.normalize(torch.randn(memory_bank_size), dim=-1))
        self.ptr = 0

    def forward(self, out0, out1):
        out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        bank = self.bank.clone().detach().transpose(0, -1)
        if out0.requires_grad:
            n, q = out1.shape[0], self.bank.shape[0]
            if self.ptr + n >= q:
                self.bank[self.ptr:] = out1[:q - self.ptr].detach()
                self.ptr = 0
            else:
                self.bank[self.ptr:self.ptr + n] = out1.detach()
                self.ptr += n
        sim_pos = torch.einsum("nc,nc->n", out0, out1).unsqueeze(-1)
        sim_neg = torch.einsum("nc,ck->nk", out0, bank.to(out0.device))
        logits = torch.cat([sim_pos, sim_neg], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long,
                                                   device=logits.device))


def mnrl(anchors, positives, negatives, scale):
    """sentence-transformers' MultipleNegativesRankingLoss(scale) with hard negatives: every
    anchor against [positives; all hard negatives], cosine similarity times scale, label i."""
    candidates = torch.cat([positives, negatives])
    scores = scale * F.normalize(anchors, dim=1) @ F.normalize(candidates, dim=1).T
    return F.cross_entropy(scores, torch.arange(anchors.shape[0], device=anchors.device))


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _rss_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak extra memory of a block, in MiB (None when it cannot be measured here)."""

    def __init__(self, device):
        self.device = device
        self.extra_mib = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        libc = _libc()
        if libc:
            libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident set (VmHWM) to the current one
            self.base = _rss_kib("VmRSS")
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.extra_mib = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        elif self.base is not None:
            peak = _rss_kib("VmHWM")
            self.extra_mib = None if peak is None else (peak - self.base) / 1024
        return False


def time_steps(step, device, steps, warmup=1):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bank_rows(args, device, dtype):
    lightly_cls, lightly_name = lightly_ntxent_class()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, args.dim, generator=g).to(device, dtype),
                torch.randn(args.batch, args.dim, generator=g).to(device, dtype))
               for _ in range(4)]
    impls = [(lightly_name, lambda: lightly_cls(0.1, memory_bank_size=(args.bank, args.dim)))]
    for backend in usable(device):
        impls.append((f"macl-kernels {backend}", lambda b=backend: mk.NTXentLoss(
            0.1, memory_bank_size=(args.bank, args.dim), backend=b)))
    rows, losses = [], {}
    for name, make in impls:
        torch.manual_seed(1)
        crit = make().to(device=device, dtype=dtype)
        state = {"i": 0}

        def step():
            q, k = batches[state["i"] % len(batches)]
            state["i"] += 1
            q = q.clone().requires_grad_()
            loss = crit(q, k)
            loss.backward()
            return loss

        # Losses of the same first step from the same seed: the drop-in check of the table.
        torch.manual_seed(1)
        fresh = make().to(device=device, dtype=dtype)
        q0 = batches[0][0].clone().requires_grad_()
        losses[name] = fresh(q0, batches[0][1]).item()
        del fresh
        seconds = time_steps(step, device, args.steps)
        with PeakMemory(device) as mem:
            step()
        rows.append(dict(benchmark="memory bank", implementation=name,
                         shape=f"N={args.batch} bank={args.bank}x{args.dim}",
                         dtype=str(dtype).replace("torch.", ""), device=device_name(device),
                         fwd_bwd_ms=round(1e3 * seconds, 3),
                         peak_extra_mib=None if mem.extra_mib is None else round(mem.extra_mib,
                                                                                 1),
                         first_step_loss=losses[name], max_abs_diff_vs_peer=""))
        del crit
    peer = losses[impls[0][0]]
    for row in rows[1:]:
        row["max_abs_diff_vs_peer"] = f"{abs(row['first_step_loss'] - peer):.2e}"
    return rows


def mnrl_rows(args, device, dtype):
    g = torch.Generator().manual_seed(2)
    n, h, d, scale = args.pairs, args.hard, args.dim, 20.0
    a, p = (torch.randn(n, d, generator=g).to(device, dtype) for _ in range(2))
    neg = torch.randn(n * h, d, generator=g).to(device, dtype)
    impls = [("MNRL formula (materialised scores)", lambda x, y, z: mnrl(x, y, z, scale))]
    for backend in usable(device):
        impls.append((f"macl-kernels {backend}", lambda x, y, z, b=backend: mk.infonce_loss(
            x, y, layout="cross", temperature=1 / scale, negatives=z, backend=b)))
    rows, results = [], {}
    for name, fn in impls:
        def run():
            leaves = [t.clone().requires_grad_() for t in (a, p, neg)]
            loss = fn(*leaves)
            loss.backward()
            return [loss.detach()] + [t.grad for t in leaves]

        results[name] = run()
        seconds = time_steps(run, device, args.steps)
        with PeakMemory(device) as mem:
            run()
        rows.append(dict(benchmark="hard negatives (MNRL)", implementation=name,
                         shape=f"N={n} h={h} D={d}", dtype=str(dtype).replace("torch.", ""),
                         device=device_name(device), fwd_bwd_ms=round(1e3 * seconds, 3),
                         peak_extra_mib=None if mem.extra_mib is None else round(mem.extra_mib,
                                                                                 1),
                         first_step_loss=results[name][0].item(), max_abs_diff_vs_peer=""))
    peer = results[impls[0][0]]
    for row, (name, _) in zip(rows[1:], impls[1:]):
        row["max_abs_diff_vs_peer"] = "loss {:.2e}, grads {:.2e}".format(
            (results[name][0] - peer[0]).abs().item(),
            max((x - y).abs().max().item() for x, y in zip(results[name][1:], peer[1:])))
    return rows


def usable(device):
    return [name for name, reason in mk.available_backends(device).items()
            if reason is None and name != "reference"]


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--bank", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=4096)
    parser.add_argument("--hard", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true",
                        help="a quick check: N=64, bank 4096, 512 pairs, 2 steps")
    parser.add_argument("--out", default="bench/results/dropins")
    args = parser.parse_args(argv)
    if args.small:
        args.batch, args.bank, args.pairs, args.steps = 64, 4096, 512, 2
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = bank_rows(args, device, dtype) + mnrl_rows(args, device, dtype)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dropins.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    table = "\n".join(lines)
    with open(os.path.join(args.out, "dropins.md"), "w") as f:
        f.write(f"`python bench/bench_dropins.py {' '.join(argv or sys.argv[1:])}`, torch "
                f"{torch.__version__}, macl-kernels {mk.__version__}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
