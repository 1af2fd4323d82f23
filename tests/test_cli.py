"""Smoke tests of the ``macl-kernels`` console script (``python -m macl_kernels``).

The subcommands run in subprocesses, as a user runs them, so that argument parsing, exit statuses
and the bench's worker processes are exercised for real; the tolerance logic of ``verify`` is
checked in-process through ``run_verify``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import macl_kernels as mk
from macl_kernels.tools import bench as _bench, cases as _cases, cli, profile as _profile
from macl_kernels.tools import roofline as _roofline, verify as _verify

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # conftest turns Triton's interpreter on for this process; the CLI's subprocesses run as a
    # user's would, without it (the Triton kernels have their own tests).
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "macl_kernels", *args], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=timeout)


@pytest.mark.slow
def test_info_mentions_every_backend():
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    assert mk.__version__ in proc.stdout
    for name, reason in mk.available_backends().items():
        assert f"{name}: " in proc.stdout
        assert ("usable" if reason is None else reason) in proc.stdout


@pytest.mark.parametrize("command", [[], ["info"], ["verify"], ["bench"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: macl-kernels" in capsys.readouterr().out


def test_missing_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


@pytest.mark.slow
def test_verify_passes_at_small_size():
    proc = run_cli("verify", "--dtype", "all")  # the default size, docs/math.md#tolerances
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table_rows = [line.split() for line in proc.stdout.splitlines()]
    assert any(row[:1] == ["torch"] for row in table_rows)
    # Every loss configuration and layout was checked (clip: cross_sym only).
    backends = sorted(name for name, reason in mk.available_backends("cpu").items()
                      if reason is None and name not in ("reference", "triton"))
    assert f"backends: {', '.join(backends)};" in proc.stdout
    layouts = sum(len(case.layouts) for case in _cases.ALL_CASES.values())
    expected = layouts * len(_cases.DTYPES) * len(backends)
    assert f"{expected}/{expected} checks passed" in proc.stdout


def test_verify_exit_status_reflects_tolerance_misses():
    kwargs = dict(n=8, d=4, dtypes=["float32"], backends=["torch"], device="cpu",
                  losses=["infonce", "macl", "clip"])
    assert _verify.run_verify(**kwargs, out=io.StringIO()) == 0
    out = io.StringIO()
    status = _verify.run_verify(**kwargs, tolerances={"float32": 0.0}, out=out)
    assert status == 1
    assert "FAIL" in out.getvalue()


def test_verify_result_pass_rules():
    def result(errors):
        return _verify.VerifyResult("torch", "clip", "cross_sym", "float32", errors, 1e-5)

    assert result({"loss": 1e-6, "dscale": 1e-5}).ok
    assert not result({"loss": 1e-7, "dscale": 3e-5}).ok
    assert not result({"loss": float("nan")}).ok
    assert not _verify.VerifyResult("torch", "macl", "2n", "float32", {}, 1e-5, "ValueError: x").ok


def test_verify_reports_backend_errors_as_failures():
    results = _verify.verify_cases(n=1, d=4, dtypes=["float32"], backends=["torch"], device="cpu",
                               losses=["macl"])  # N = 1 has no negatives: every case raises
    assert results and all(not r.ok and "ValueError" in r.error for r in results)


@pytest.mark.slow
def test_bench_tiny_run_writes_csv_and_png(tmp_path):
    out_dir = tmp_path / "bench"
    proc = run_cli("bench", "--sizes", "64,128", "--dim", "16", "--repeats", "1",
                   "--backends", "reference,torch", "--threads", "1", "--no-progress",
                   "--out", str(out_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out_dir / "bench.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == _bench.CSV_COLUMNS
        rows = list(reader)
    assert sorted((r["backend"], int(r["N"])) for r in rows) == [
        ("reference", 64), ("reference", 128), ("torch", 64), ("torch", 128)]
    for r in rows:
        assert r["error"] == "", r["error"]
        assert (r["loss"], r["layout"], r["D"], r["dtype"]) == ("macl", "2n", "16", "float32")
        assert 0 < float(r["p20_s"]) <= float(r["median_s"]) <= float(r["p80_s"])
        assert int(r["peak_extra_bytes"]) >= 0
        assert r["device"] and r["torch_version"]
        assert float(r["speedup_vs_reference"]) > 0
    assert all(float(r["speedup_vs_reference"]) == 1.0 for r in rows if r["backend"] == "reference")
    assert (out_dir / "bench.png").stat().st_size > 0
    assert "torch" in proc.stdout and "speedup" in proc.stdout
    # The roofline: the matmul rate measured in the same run, each row's useful GFLOP/s and its
    # fraction of that rate (values only checked for sanity: no test asserts a speed).
    assert "matmul rate (torch.mm, float32" in proc.stdout and "of matmul" in proc.stdout
    for r in rows:
        values = {k: float(r[k]) for k in ("useful_gflop", "useful_gflops", "matmul_gflops",
                                           "matmul_tile_gflops", "fraction_of_matmul",
                                           "fraction_of_matmul_tile")}
        assert all(math.isfinite(v) and v > 0 for v in values.values()), values
        assert values["useful_gflop"] == _roofline.useful_flops("2n", int(r["N"]), 16) / 1e9
        assert values["fraction_of_matmul"] == pytest.approx(
            values["useful_gflops"] / values["matmul_gflops"])
        assert r["matmul_shape"] == "256x16 @ 16x256"  # min(2 * 128, 4096) in layout 2n


@pytest.mark.slow
def test_profile_tiny_run_reports_the_roofline(tmp_path):
    out_dir = tmp_path / "profile"
    proc = run_cli("profile", "--loss", "clip", "--sizes", "64", "--dim", "8", "--repeats", "1",
                   "--backends", "torch", "--threads", "1", "--no-op-profile", "--no-progress",
                   "--out", str(out_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "matmul rate (torch.mm" in proc.stdout and "step/mm" in proc.stdout
    with open(out_dir / "profile.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == _profile.PROFILE_COLUMNS
        (row,) = list(reader)
    assert row["error"] == "" and row["layout"] == "cross_sym"
    for phase in ("forward", "backward", "step"):
        gflops = float(row[f"{phase}_useful_gflops"])
        frac = float(row[f"{phase}_fraction_of_matmul"])
        assert math.isfinite(gflops) and gflops > 0 and math.isfinite(frac) and frac > 0
        assert frac == pytest.approx(gflops / float(row["matmul_gflops"]))
    assert float(row["step_fraction_of_matmul_tile"]) > 0
    assert row["matmul_shape"] == "64x8 @ 8x64"  # cross_sym: S is N x N
    assert (out_dir / "profile.png").stat().st_size > 0


@pytest.mark.slow  # a worker subprocess (timed out)
def test_bench_records_worker_failures_and_continues():
    config = _bench.BenchConfig(sizes=(64,), dim=8, backends=("torch",), repeats=1,
                                timeout_s=0.01)
    result = _bench.run_worker(config, "torch", 64)
    assert result == {"ok": False, "error": "timed out after 0.01 s"}
    rows = _bench.csv_rows(config, [_bench.Measurement("torch", 64, result)])
    assert rows[0]["error"] == "timed out after 0.01 s"
    assert rows[0]["median_s"] is None and rows[0]["speedup_vs_reference"] is None
    assert "timed out" in _bench.format_results(rows)


def test_worker_entry_point_measures_one_cell_and_prints_json(capsys):
    """The one worker entry point: each kind prints one JSON line; an error is data."""
    from macl_kernels.tools import worker as _worker

    assert _worker.main(["bench", "--loss", "clip", "--layout", "cross_sym", "--backend", "torch",
                         "--n", "16", "--dim", "4", "--dtype", "float32", "--repeats", "2",
                         "--threads", "1"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["ok"] and r["loss"] == "clip" and len(r["times_s"]) == 2
    assert r["p20_s"] <= r["median_s"] <= r["p80_s"] and r["peak_extra_bytes"] >= 0
    assert _worker.main(["profile", "--loss", "macl", "--layout", "2n", "--backend", "torch",
                         "--n", "16", "--dim", "4", "--dtype", "float32", "--no-op-profile"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["ok"] and r["anchors"] == 32 and r["repeats"] == 1
    assert all(r[f"{phase}_ms"] >= 0 for phase in _profile.PHASES) and r["step_ms"] > 0
    assert _worker.main(["bench", "--loss", "nope", "--layout", "2n", "--backend", "torch",
                         "--n", "16", "--dim", "4", "--dtype", "float32", "--repeats", "1"]) == 1
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r == {"ok": False, "error": r["error"]} and "ValueError: loss:" in r["error"]
    with pytest.raises(ValueError, match="kind"):
        _worker.command("nope", [])


@pytest.mark.parametrize("loss,layout", [("clip", "cross_sym"), ("siglip", "cross"),
                                         ("macl", "2n")])
def test_loss_step_trains_the_logit_scale_where_the_case_has_one(loss, layout):
    from macl_kernels.tools import worker as _worker

    z1, z2 = _worker.make_inputs(8, 4, torch.float64, torch.device("cpu"), 0)
    step = _worker.make_step(loss, layout, "torch", z1, z2)
    step()
    has_scale = _cases.ALL_CASES[loss].uses_logit_scale
    assert len(step.leaves) == 2 + has_scale
    assert all(leaf.grad is not None and torch.isfinite(leaf.grad).all() for leaf in step.leaves)
    if has_scale:
        assert step.logit_scale.dtype == torch.float64 and step.logit_scale.requires_grad
    # The phases of the profile give the same loss as the whole step.
    whole = step.loss(z1, z2)
    phased = step.forward(step.normalise())
    torch.testing.assert_close(phased, whole)


@pytest.mark.slow  # fresh interpreters
def test_matmul_worker_runs_as_a_file_without_the_package(tmp_path):
    from macl_kernels.tools import worker as _worker

    cmd = _worker.command("matmul", ["--layout", "cross", "--n-max", "32", "--dim", "8",
                                     "--dtype", "float32", "--threads", "1"])
    assert cmd[1].endswith(os.path.join("tools", "worker.py"))
    r = _worker.run_worker_process(cmd, 120)
    assert r["ok"] and r["matmul_shape"] == "32x8 @ 8x32" and r["matmul_gflops"] > 0
    # Run as a file, the worker imports roofline.py alone, not the package (its backends).
    code = ("import runpy, sys\n"
            "sys.argv = sys.argv[1:]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "print('package imported:', 'macl_kernels' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, *cmd[1:]], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert '"ok": true' in proc.stdout and "package imported: False" in proc.stdout
