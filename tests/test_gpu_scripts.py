"""The GPU session scripts cannot rot between GPU sessions: bench/gpu/gpu_first_contact.sh and
bench/gpu/gpu_staged_checks.sh parse (``bash -n``), and their dry runs list every step with its
timeout and estimate, keep first contact within its 7 minutes and every stage within 8, find
every file they run, and lay out their output directory."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_CONTACT = os.path.join(ROOT, "bench", "gpu", "gpu_first_contact.sh")
STAGED = os.path.join(ROOT, "bench", "gpu", "gpu_staged_checks.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args):
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.mark.parametrize("script", [FIRST_CONTACT, STAGED], ids=["first_contact", "staged"])
def test_scripts_parse(script):
    proc = _run("-n", script)
    assert proc.returncode == 0, proc.stderr


def test_first_contact_dry_run(tmp_path):
    proc = _run(FIRST_CONTACT, "--dry-run", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = ["preflight", "build", "triton_smoke", "build_wait", "cuda_smoke", "memcheck",
             "racecheck"] + [f"bench_{d}_{b}" for d in ("bf16", "fp32")
                             for b in ("torch", "triton", "cuda")]
    listed = [line.split()[0] for line in proc.stdout.splitlines()[1:len(steps) + 1]]
    assert listed == steps
    estimate = int(re.search(r"estimated wall time: (\d+) s", proc.stdout).group(1))
    assert 0 < estimate <= 420
    with open(tmp_path / "out" / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == steps
    assert all(int(r["timeout_s"]) >= int(r["estimate_s"]) > 0 for r in rows)


def test_staged_checks_dry_run(tmp_path):
    proc = _run(STAGED, "--dry-run", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = re.findall(r"stage (\w+): timeouts sum to (\d+) s", proc.stdout)
    assert {name for name, _ in stages} >= {"triton_tests", "cuda_tests", "verify",
                                            "bench_bf16", "bench_fp32"}
    assert all(int(total) <= 480 for _, total in stages)


def test_staged_checks_refuse_an_unknown_stage(tmp_path):
    proc = _run(STAGED, str(tmp_path / "out"), "no_such_stage")
    assert proc.returncode == 2 and "unknown stage" in proc.stdout
