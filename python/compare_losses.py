"""MACL vs InfoNCE on the digits (several seeds), and the same MACL run on every backend.

    python python/compare_losses.py --out bench/results/simclr_digits     # ~10-15 min, 2 CPUs
    python python/compare_losses.py --tiny --out /tmp/cmp                 # smoke test, seconds

Three experiments, every run a ``python/train_simclr.py`` training (same split, architecture,
augmentations, optimiser and step budget; called in this process):

1. **Losses**: each of ``--losses`` (default MACL and InfoNCE) with each of ``--seeds`` on the
   fused backend ``--backend`` (default ``auto``, i.e. the fastest usable one here). A seed fixes
   the initialisation, the batches and the augmentations, so MACL and InfoNCE with the same seed
   see exactly the same images and views. Reported: final linear-probe, 5-labels-per-class probe
   and kNN accuracy on the held-out split, mean, sample standard deviation and range over seeds.
2. **Backends**: MACL, seed ``--seeds[0]``, float32, on every backend of ``--backends`` (default
   every usable one, the full-matrix ``reference`` first): the loss curve of each against the
   reference's (maximum relative difference over epochs; float32 training amplifies rounding
   differences step after step, so expect 1e-6..1e-3, growing with the epochs) and the time per
   epoch and per loss step (forward+backward of the loss alone) of each.
3. **float64 check**: the same MACL run for ``--f64-epochs`` epochs in float64 on every backend:
   the loss curves must agree to float64 rounding (``--f64-rtol``, default 1e-9), which shows
   that the float32 differences above are rounding, not a different loss. Exit status 1 if not.

Outputs in ``--out``: ``summary.csv`` (one row per run), ``accuracy.csv`` (per loss: mean,
std, min, max over seeds), ``training_curves.png`` (mean and range over seeds per loss),
``backends.png`` (loss curves and time per epoch per backend), ``runs/<name>/curves.csv`` and
``summary.json`` of every run, and ``README.md`` with the command and the tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # train_simclr.py lives next to this file

import train_simclr  # noqa: E402  (also puts the repository on sys.path if needed)
import torch  # noqa: E402

import macl_kernels as mk  # noqa: E402

SUMMARY_COLUMNS = (
    "experiment", "run", "loss", "backend", "seed", "dtype", "epochs", "batch_size",
    "final_probe_acc", "final_fewshot_acc", "final_knn_acc", "init_probe_acc",
    "init_fewshot_acc", "init_knn_acc", "final_loss", "final_temperature", "final_alignment",
    "mean_epoch_s", "median_epoch_s", "mean_loss_ms_per_step", "median_loss_ms_per_step",
    "max_rel_loss_diff_vs_reference", "wall_s",
)
ACC_KEYS = ("final_probe_acc", "final_fewshot_acc", "final_knn_acc")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("bench", "results", "simclr_digits"))
    p.add_argument("--losses", default="macl,infonce",
                   help="comma-separated losses of experiment 1 (default macl,infonce)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=30, help="epochs per run (default 30)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (default 256)")
    p.add_argument("--backend", default="auto",
                   help="backend of experiment 1 (default auto: the fastest usable here)")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends of experiments 2 and 3 (default every usable "
                        "one on the CPU, reference first)")
    p.add_argument("--f64-epochs", type=int, default=3, help="epochs of experiment 3 (default 3)")
    p.add_argument("--f64-rtol", type=float, default=1e-9,
                   help="float64 loss-curve tolerance vs the reference (default 1e-9)")
    p.add_argument("--probe-every", type=int, default=5, help="linear probe every N epochs")
    p.add_argument("--width", type=int, default=128, help="backbone width (default 128)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--tiny", action="store_true",
                   help="smoke test: 1 epoch of 2 steps, batch 32, width 16, seeds 0,1, "
                        "2 few-shot draws, float64 check 1 epoch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.tiny:
        args.epochs, args.batch_size, args.width, args.f64_epochs = 1, 32, 16, 1
        args.seeds = ",".join(args.seeds.split(",")[:2])
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.loss_list = [s.strip() for s in args.losses.split(",") if s.strip()]
    unknown = [name for name in args.loss_list if name not in train_simclr.LOSSES]
    if unknown or not args.seed_list:
        p.error(f"unknown losses {unknown} (choose from {train_simclr.LOSSES}) or no seeds")
    usable = [name for name, reason in mk.available_backends("cpu").items() if reason is None]
    if args.backends is None:
        args.backend_list = ["reference"] + [b for b in usable if b != "reference"]
    else:
        args.backend_list = [s.strip() for s in args.backends.split(",") if s.strip()]
        bad = [b for b in args.backend_list if b not in usable]
        if bad:
            p.error(f"backends {bad} are not usable here; usable: {usable}")
        if "reference" not in args.backend_list:
            args.backend_list.insert(0, "reference")
    return args


def train_run(args, out_root: str, name: str, loss: str, backend: str, seed: int,
              dtype: str = "float32", epochs: Optional[int] = None) -> Dict:
    argv = ["--loss", loss, "--backend", backend, "--seed", str(seed), "--dtype", dtype,
            "--epochs", str(epochs or args.epochs), "--batch-size", str(args.batch_size),
            "--width", str(args.width), "--probe-every", str(args.probe_every),
            "--out", os.path.join(out_root, "runs", name), "--no-plot", "--quiet"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.tiny:
        argv += ["--max-steps", "2", "--fewshot-draws", "2"]
    if args.no_progress:
        argv.append("--no-progress")
    t0 = time.perf_counter()
    result = train_simclr.train(train_simclr.parse_args(argv))
    result["wall_s"] = time.perf_counter() - t0
    result["name"] = name
    return result


def rel_diff(curve: Sequence[float], ref: Sequence[float]) -> float:
    a, b = np.asarray(curve, dtype=float), np.asarray(ref, dtype=float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def losses_of(result: Dict) -> List[float]:
    return [r["loss"] for r in result["rows"][1:]]


def summary_row(experiment: str, result: Dict, ref: Optional[Dict] = None) -> Dict:
    s, a, last = result["summary"], result["summary"]["args"], result["rows"][-1]
    trained = result["rows"][1:]
    return {
        "experiment": experiment, "run": result["name"], "loss": a["loss"],
        "backend": a["resolved_backend"], "seed": a["seed"], "dtype": a["dtype"],
        "epochs": a["epochs"], "batch_size": a["batch_size"],
        **{k: s[k] for k in ACC_KEYS},
        "init_probe_acc": s["init_probe_acc"], "init_fewshot_acc": s["init_fewshot_acc"],
        "init_knn_acc": s["init_knn_acc"], "final_loss": last["loss"],
        "final_temperature": last.get("temperature"), "final_alignment": last["alignment"],
        "mean_epoch_s": s["mean_epoch_s"], "median_epoch_s": s["median_epoch_s"],
        "mean_loss_ms_per_step": s["mean_loss_ms_per_step"],
        "median_loss_ms_per_step": float(np.median([r["loss_ms"] for r in trained])),
        "max_rel_loss_diff_vs_reference":
            None if ref is None else rel_diff(losses_of(result), losses_of(ref)),
        "wall_s": result["wall_s"],
    }


def write_csv(path: str, columns: Sequence[str], rows: Sequence[Dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


def accuracy_table(rows: Sequence[Dict], losses: Sequence[str]) -> List[Dict]:
    out = []
    for loss in losses:
        runs = [r for r in rows if r["experiment"] == "losses" and r["loss"] == loss]
        entry = {"loss": loss, "seeds": " ".join(str(r["seed"]) for r in runs)}
        for key in ACC_KEYS:
            v = np.array([r[key] for r in runs], dtype=float)
            entry.update({f"{key}_mean": float(v.mean()),
                          f"{key}_std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                          f"{key}_min": float(v.min()), f"{key}_max": float(v.max())})
        out.append(entry)
    return out


def plot_losses(path: str, results: Dict[str, List[Dict]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    panels = [("loss", "training loss"), ("temperature", "temperature (MACL: tau(A))"),
              ("alignment", "alignment A (mean positive cosine)"),
              ("accuracy", "held-out accuracy")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (loss, runs) in enumerate(results.items()):
        color = colors[i % len(colors)]
        for key, ax in zip([p[0] for p in panels], axes):
            if key == "accuracy":
                for metric, style, label in (("knn_acc", "-", "kNN"),
                                             ("fewshot_acc", "o--", "5-shot probe"),
                                             ("probe_acc", "s:", "linear probe")):
                    epochs = [r["epoch"] for r in runs[0]["rows"] if r.get(metric) is not None]
                    vals = np.array([[r[metric] for r in run["rows"] if r.get(metric) is not None]
                                     for run in runs])
                    ax.plot(epochs, vals.mean(0), style, color=color, ms=3,
                            label=f"{loss} {label}")
                    ax.fill_between(epochs, vals.min(0), vals.max(0), color=color, alpha=0.12)
                continue
            rows = [r for r in runs[0]["rows"][1:] if r.get(key) is not None]
            if not rows:
                continue
            epochs = [r["epoch"] for r in rows]
            vals = np.array([[r[key] for r in run["rows"][1:]] for run in runs], dtype=float)
            ax.plot(epochs, vals.mean(0), "-", color=color, label=f"{loss} (mean)")
            ax.fill_between(epochs, vals.min(0), vals.max(0), color=color, alpha=0.2,
                            label=f"{loss} (range over {len(runs)} seeds)")
    for (key, label), ax in zip(panels, axes):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_backends(path: str, runs: Dict[str, Dict], rows: Sequence[Dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_d, ax_t) = plt.subplots(1, 3, figsize=(16, 4.2))
    ref = losses_of(runs["reference"])
    for backend, result in runs.items():
        epochs = [r["epoch"] for r in result["rows"][1:]]
        curve = losses_of(result)
        ax_l.plot(epochs, curve, "-" if backend == "reference" else "--", label=backend)
        if backend != "reference":
            diff = np.abs(np.asarray(curve) - np.asarray(ref)) / np.abs(np.asarray(ref))
            ax_d.semilogy(epochs, np.maximum(diff, 1e-12), "o-", ms=3, label=backend)
    by_backend = {r["backend"]: r for r in rows}
    names = list(runs)
    x = np.arange(len(names))
    ax_t.bar(x - 0.2, [by_backend[b]["median_epoch_s"] for b in names], 0.4,
             label="epoch (median s)")
    ax_t2 = ax_t.twinx()
    ax_t2.bar(x + 0.2, [by_backend[b]["median_loss_ms_per_step"] for b in names], 0.4,
              color="C1", label="loss fwd+bwd (median ms/step)")
    ax_t.set_xticks(x)
    ax_t.set_xticklabels(names)
    ax_t.set_ylabel("time per epoch (s)")
    ax_t2.set_ylabel("loss forward+backward per step (ms)")
    h1, l1 = ax_t.get_legend_handles_labels()
    h2, l2 = ax_t2.get_legend_handles_labels()
    ax_t.legend(h1 + h2, l1 + l2, fontsize=8)
    ax_l.set_ylabel("MACL training loss (float32)")
    ax_d.set_ylabel("relative difference vs reference")
    for ax in (ax_l, ax_d):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def write_readme(path: str, args, command: str, rows, acc, f64_rows, wall_s: float) -> None:
    lines = [
        "# SimCLR on scikit-learn's digits: MACL vs InfoNCE, and reference vs fused backends",
        "",
        "Produced by (from the repository root):",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs "
        f"(shared with other jobs: timings are noisy), torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads. Total wall time {wall_s / 60:.1f} min.",
        f"Each run: {args.epochs} epochs, batch {args.batch_size} images ({2 * args.batch_size} "
        f"views), CNN width {args.width}, Adam + cosine decay, held-out split of 540 images "
        "(split seed 0). See `python/train_simclr.py` for the data, augmentations and probes.",
        "",
        "## 1. Held-out accuracy after training (mean ± sample std over seeds; [min, max])",
        "",
        "| loss | seeds | linear probe (all labels) % | 5 labels/class probe % | kNN (k=10) % |",
        "|---|---|---|---|---|",
    ]
    for e in acc:
        cells = [f"{_pct(e[k + '_mean'])} ± {_pct(e[k + '_std'])} "
                 f"[{_pct(e[k + '_min'])}, {_pct(e[k + '_max'])}]" for k in ACC_KEYS]
        lines.append(f"| {e['loss']} | {e['seeds']} | " + " | ".join(cells) + " |")
    base = [r for r in rows if r["experiment"] == "losses"][:1]
    if base:
        b = base[0]
        lines += ["", f"Untrained encoder (seed {b['seed']}): linear probe "
                      f"{_pct(b['init_probe_acc'])} %, 5-shot {_pct(b['init_fewshot_acc'])} %, "
                      f"kNN {_pct(b['init_knn_acc'])} %. The digits are small and clean, so "
                      "the all-label probe saturates near 99 %; the 5-labels-per-class probe "
                      "separates the losses better."]
    lines += ["", "Per run:", "", "| run | loss | backend | seed | probe % | 5-shot % | kNN % | "
              "final loss | final tau | final A |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["experiment"] != "losses":
            continue
        tau = "-" if r["final_temperature"] is None else f"{r['final_temperature']:.4f}"
        lines.append(f"| {r['run']} | {r['loss']} | {r['backend']} | {r['seed']} | "
                     f"{_pct(r['final_probe_acc'])} | {_pct(r['final_fewshot_acc'])} | "
                     f"{_pct(r['final_knn_acc'])} | {r['final_loss']:.4f} | {tau} | "
                     f"{r['final_alignment']:.4f} |")
    lines += ["", "![training curves](training_curves.png)", "",
              "## 2. The same MACL run on every backend (float32)", "",
              "| backend | median s/epoch | mean s/epoch | loss fwd+bwd median ms/step | "
              "max rel. diff of the loss curve vs reference |", "|---|---|---|---|---|"]
    for r in rows:
        if r["experiment"] != "backends":
            continue
        diff = r["max_rel_loss_diff_vs_reference"]
        lines.append(f"| {r['backend']} | {r['median_epoch_s']:.3f} | {r['mean_epoch_s']:.3f} | "
                     f"{r['median_loss_ms_per_step']:.2f} | "
                     f"{'-' if diff is None else f'{diff:.1e}'} |")
    lines += ["", "Time per epoch includes the encoder's forward and backward, the augmentations "
                  "and the optimiser (the loss is a small part at this batch size); the loss "
                  "column times the loss's forward+backward alone. float32 trajectories drift "
                  "apart by amplified rounding (different summation orders), step after step.",
              "", "![backends](backends.png)", "",
              f"## 3. float64 check ({args.f64_epochs} epochs)", "",
              "| backend | max rel. diff of the loss curve vs reference | within "
              f"{args.f64_rtol:g} |", "|---|---|---|"]
    for r in f64_rows:
        diff = r["max_rel_loss_diff_vs_reference"]
        if diff is None:
            continue
        lines.append(f"| {r['backend']} | {diff:.1e} | {'yes' if diff <= args.f64_rtol else 'NO'} |")
    lines.append("")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    command = "python python/compare_losses.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    rows: List[Dict] = []

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {text}", flush=True)

    # 1. Losses x seeds.
    by_loss: Dict[str, List[Dict]] = {loss: [] for loss in args.loss_list}
    for seed in args.seed_list:
        for loss in args.loss_list:
            result = train_run(args, args.out, f"{loss}_s{seed}", loss, args.backend, seed)
            by_loss[loss].append(result)
            rows.append(summary_row("losses", result))
            r = rows[-1]
            log(f"{loss} seed {seed} ({r['backend']}): probe {_pct(r['final_probe_acc'])} %, "
                f"5-shot {_pct(r['final_fewshot_acc'])} %, kNN {_pct(r['final_knn_acc'])} %, "
                f"{r['median_epoch_s']:.2f} s/epoch")
    acc = accuracy_table(rows, args.loss_list)

    # 2. The same MACL run per backend, float32.
    seed = args.seed_list[0]
    backend_runs: Dict[str, Dict] = {}
    for backend in args.backend_list:
        backend_runs[backend] = train_run(args, args.out, f"backend_{backend}", "macl", backend,
                                          seed)
        rows.append(summary_row("backends", backend_runs[backend],
                                backend_runs.get("reference")))
        r = rows[-1]
        log(f"macl on {backend}: {r['median_epoch_s']:.2f} s/epoch, loss "
            f"{r['median_loss_ms_per_step']:.2f} ms/step, curve vs reference "
            f"{r['max_rel_loss_diff_vs_reference'] or 0:.1e}")

    # 3. float64: the loss curves agree to rounding.
    f64_runs: Dict[str, Dict] = {}
    f64_rows = []
    for backend in args.backend_list:
        f64_runs[backend] = train_run(args, args.out, f"f64_{backend}", "macl", backend, seed,
                                      dtype="float64", epochs=args.f64_epochs)
        f64_rows.append(summary_row("float64", f64_runs[backend], f64_runs.get("reference")))
    rows += f64_rows
    f64_ok = all(r["max_rel_loss_diff_vs_reference"] is None
                 or r["max_rel_loss_diff_vs_reference"] <= args.f64_rtol for r in f64_rows)
    log("float64 loss curves vs reference: " + ", ".join(
        f"{r['backend']} {r['max_rel_loss_diff_vs_reference']:.1e}" for r in f64_rows
        if r["max_rel_loss_diff_vs_reference"] is not None) + (" ok" if f64_ok else " MISMATCH"))

    wall = time.perf_counter() - start
    write_csv(os.path.join(args.out, "summary.csv"), SUMMARY_COLUMNS, rows)
    acc_columns = ["loss", "seeds"] + [f"{k}_{s}" for k in ACC_KEYS
                                       for s in ("mean", "std", "min", "max")]
    write_csv(os.path.join(args.out, "accuracy.csv"), acc_columns, acc)
    plot_losses(os.path.join(args.out, "training_curves.png"), by_loss,
                f"SimCLR on digits, {args.epochs} epochs, batch {args.batch_size}, "
                f"seeds {args.seeds} (mean and range over seeds)")
    plot_backends(os.path.join(args.out, "backends.png"), backend_runs,
                  [r for r in rows if r["experiment"] == "backends"],
                  f"the same MACL run (seed {seed}, float32) on each backend")
    write_readme(os.path.join(args.out, "README.md"), args, command, rows, acc, f64_rows, wall)
    with open(os.path.join(args.out, "machine.json"), "w", encoding="utf-8") as f:
        json.dump({"platform": platform.platform(), "cpus": os.cpu_count(),
                   "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                   "backends": args.backend_list, "wall_s": wall}, f, indent=2)
    for e in acc:
        log(f"{e['loss']}: probe {_pct(e['final_probe_acc_mean'])} ± "
            f"{_pct(e['final_probe_acc_std'])} %, 5-shot {_pct(e['final_fewshot_acc_mean'])} ± "
            f"{_pct(e['final_fewshot_acc_std'])} %, kNN {_pct(e['final_knn_acc_mean'])} ± "
            f"{_pct(e['final_knn_acc_std'])} % over seeds {e['seeds']}")
    log(f"wrote {args.out} in {wall / 60:.1f} min")
    return 0 if f64_ok else 1


if __name__ == "__main__":
    sys.exit(main())
