"""The users' journeys run end to end on tiny settings: SimCLR training on the digits, the loss
and backend comparison, ``macl-kernels profile`` with a memory budget, the pytest-benchmark
micro-benchmarks (collected with ``--benchmark-disable``) and their plot."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_FILES = ["bench/bench_micro.py"]


def run(args, timeout=300, **env_extra):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **env_extra)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_train_simclr_one_short_epoch(tmp_path):
    out = tmp_path / "run"
    proc = run([sys.executable, "python/train_simclr.py", "--loss", "macl", "--backend", "torch",
                "--epochs", "1", "--max-steps", "2", "--batch-size", "32", "--width", "16",
                "--fewshot-draws", "2", "--threads", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_csv(out / "curves.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    last = rows[-1]
    for key in ("loss", "temperature", "alignment", "knn_acc", "probe_acc", "fewshot_acc"):
        assert last[key] != "", key
    # MACL's temperature is tau_0 (1 + alpha A) with the defaults tau_0 = 0.1, alpha = 0.5.
    assert float(last["temperature"]) == pytest.approx(0.1 * (1 + 0.5 * float(last["alignment"])),
                                                       rel=1e-5)
    assert 0 <= float(last["probe_acc"]) <= 1
    assert (out / "curves.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["args"]["resolved_backend"] == "torch"
    assert "epoch   1" in proc.stdout and "final: linear probe" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["supcon", "isogclr"])
def test_train_simclr_labels_and_individual_temperatures(tmp_path, loss):
    """The digits script with SupCon (the training labels) and iSogCLR (per-image state)."""
    out = tmp_path / loss
    proc = run([sys.executable, "python/train_simclr.py", "--loss", loss, "--backend", "cpu",
                "--epochs", "2", "--max-steps", "2", "--batch-size", "32", "--width", "16",
                "--fewshot-draws", "2", "--threads", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_csv(out / "curves.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    for row in rows[1:]:
        assert float(row["loss"]) == float(row["loss"])  # finite, not NaN
        assert 0 < float(row["temperature"]) < 1


@pytest.mark.slow
def test_train_simclr_rejects_bad_arguments():
    proc = run([sys.executable, "python/train_simclr.py", "--backend", "no-such-backend"])
    assert proc.returncode == 2 and "unknown backend" in proc.stderr
    proc = run([sys.executable, "python/train_simclr.py", "--loss", "nope"])
    assert proc.returncode == 2


@pytest.mark.slow
def test_compare_losses_tiny(tmp_path):
    out = tmp_path / "cmp"
    proc = run([sys.executable, "python/compare_losses.py", "--tiny", "--seeds", "0,1",
                "--backends", "torch", "--threads", "1", "--no-progress", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_csv(out / "summary.csv")
    losses = sorted((r["loss"], r["seed"]) for r in rows if r["experiment"] == "losses")
    assert losses == [("infonce", "0"), ("infonce", "1"), ("macl", "0"), ("macl", "1")]
    for experiment in ("backends", "float64"):
        assert sorted(r["backend"] for r in rows if r["experiment"] == experiment) == [
            "reference", "torch"]
    by = {(r["experiment"], r["backend"]): r for r in rows}
    assert float(by[("float64", "torch")]["max_rel_loss_diff_vs_reference"]) <= 1e-9
    assert float(by[("backends", "torch")]["max_rel_loss_diff_vs_reference"]) <= 1e-3
    acc = read_csv(out / "accuracy.csv")
    assert [a["loss"] for a in acc] == ["macl", "infonce"]
    for name in ("training_curves.png", "backends.png", "README.md"):
        assert (out / name).stat().st_size > 0
    readme = (out / "README.md").read_text()
    assert "python python/compare_losses.py --tiny" in readme and "± " in readme


@pytest.mark.slow
def test_profile_tiny_with_budget(tmp_path):
    out = tmp_path / "prof"
    proc = run([sys.executable, "-m", "macl_kernels", "profile", "--sizes", "64", "--dim", "8",
                "--repeats", "1", "--backends", "reference,torch", "--threads", "1",
                "--budget-gb", "0.001", "--search-start", "64", "--search-max-n", "128",
                "--search-time", "60", "--no-progress", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_csv(out / "profile.csv")
    assert sorted(r["backend"] for r in rows) == ["reference", "torch"]
    for r in rows:
        assert r["error"] == "", r["error"]
        assert r["N"] == "64" and r["anchors"] == "128"
        phases = [float(r[f"{p}_ms"]) for p in ("normalise", "forward", "backward")]
        assert all(p >= 0 for p in phases)
        assert float(r["step_ms"]) == pytest.approx(sum(phases), rel=0.5)
        assert float(r["pairs_per_s"]) > 0 and int(r["peak_bytes"]) >= 0
    ops = read_csv(out / "ops.csv")
    assert {o["phase"] for o in ops} >= {"forward", "backward"}
    caps = {c["backend"]: c for c in read_csv(out / "capacity.csv")}
    assert set(caps) == {"reference", "torch"}
    for c in caps.values():
        assert c["probes"]  # at least one measured probe
        assert int(c["budget_bytes"]) == int(0.001 * 2 ** 30)
        assert c["max_fit_N"] or c["first_miss_N"]
    assert (out / "profile.png").stat().st_size > 0
    assert "capacity search" in proc.stdout and "normalise ms" in proc.stdout


def test_profile_search_logic_without_subprocesses(monkeypatch):
    """Doubling then bisection on a fake memory model: peak = N^2 bytes, budget 1 MiB."""
    from macl_kernels.tools import profile as _profile

    calls = []

    def fake_worker(config, backend, n, probe=False, timeout_s=None):
        calls.append(n)
        return {"ok": True, "peak_bytes": n * n}

    monkeypatch.setattr(_profile, "run_worker", fake_worker)
    config = _profile.ProfileConfig(budget_gb=2 ** -10, search_start=64, search_max_n=4096,
                                    search_time_s=60)
    cap = _profile.search_capacity(config, "reference")
    assert cap.max_fit is not None and cap.max_fit ** 2 <= 2 ** 20
    assert 960 <= cap.max_fit <= 1024 and not cap.hit_cap
    assert calls[:5] == [64, 128, 256, 512, 1024]
    # A flat memory model reaches the cap.
    monkeypatch.setattr(_profile, "run_worker",
                        lambda *a, **k: {"ok": True, "peak_bytes": 1000})
    cap = _profile.search_capacity(config, "torch")
    assert cap.hit_cap and cap.max_fit == 4096


def test_profile_help_and_existing_subcommands_still_parse():
    from macl_kernels.tools import cli

    for command in (["profile", "--help"], ["bench", "--help"], ["verify", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(command)
        assert exc.value.code == 0


@pytest.mark.slow
def test_micro_benchmarks_collect_and_run_disabled():
    proc = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "--benchmark-disable", *MICRO_FILES], MACL_BENCH_SIZES="16",
               MACL_BENCH_DIM="8", MACL_BENCH_BACKENDS="torch")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "7 passed" in proc.stdout  # macl, infonce x2 layouts, clip, dcl + dclw, tfree


@pytest.mark.slow
def test_plot_micro_on_synthetic_json(tmp_path):
    benchmarks = []
    for backend, scale in (("reference", 2.0), ("torch", 1.0)):
        for n in (256, 512, 1024):
            t = scale * 1e-6 * n
            benchmarks.append({
                "group": "macl 2n D=128 float32 cpu", "name": f"test_macl[{backend}-N{n}]",
                "params": {"backend": backend, "n": n, "loss": "macl", "layout": "2n"},
                "extra_info": {"loss": "macl", "layout": "2n", "backend": backend, "N": n,
                               "D": 128, "dtype": "float32", "device": "cpu"},
                "stats": {"min": 0.9 * t, "max": 1.2 * t, "mean": t, "median": t,
                          "stddev": 0.1 * t, "rounds": 5},
            })
    path = tmp_path / "micro.json"
    path.write_text(json.dumps({"machine_info": {"node": "ci"}, "benchmarks": benchmarks}))
    png, table = tmp_path / "micro.png", tmp_path / "micro.csv"
    proc = run([sys.executable, "bench/plot_micro.py", str(path), "--out", str(png),
                "--csv", str(table)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert png.stat().st_size > 0
    rows = read_csv(table)
    assert len(rows) == 6 and {r["backend"] for r in rows} == {"reference", "torch"}
    # A JSON from --benchmark-disable has no stats: a clear message, exit status 1.
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": [{"params": {"n": 1}, "stats": None}]}))
    proc = run([sys.executable, "bench/plot_micro.py", str(empty), "--out", str(png)])
    assert proc.returncode == 1 and "no timed benchmarks" in proc.stderr
