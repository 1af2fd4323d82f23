"""The runnable examples in python/ run end to end (tiny settings)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Every test here runs an example script in a subprocess (torchrun for the DDP one).
pytestmark = pytest.mark.slow


def run(args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_quickstart():
    proc = run([sys.executable, "python/quickstart.py", "--steps", "3", "--batch-size", "64"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "float64 check vs reference" in proc.stdout


@pytest.mark.parametrize("nproc", [2])
def test_train_ddp_with_torchrun(nproc):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:  # torchrun ships with torch; its absence is a broken install
        pytest.fail("torchrun not found next to the Python interpreter")
    proc = run([torchrun, "--standalone", f"--nproc_per_node={nproc}", "python/train_ddp.py",
                "--steps", "3", "--batch-size", "64", "--check"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"worst relative difference ([0-9.e+-]+)", proc.stdout)
    assert match, proc.stdout
    assert float(match.group(1)) <= 1e-5  # float32: DDP step == single-process step
    assert f"{nproc} rank(s)" in proc.stdout
