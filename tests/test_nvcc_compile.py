"""CI check without a GPU: every CUDA source under csrc/ compiles with nvcc for both target
architectures of setup.py (sm_80 and sm_90a), with setup.py's nvcc flags plus the defines that
torch's CUDAExtension adds (no implicit half conversions), and without warnings from our code.
Skips only when no nvcc can be found."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CU_FILES = sorted(str(p) for p in (ROOT / "csrc").rglob("*.cu"))
ARCHS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS, as of torch 2.x; read from torch when possible.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]


def find_nvcc():
    candidates = [shutil.which("nvcc")]
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(os.path.join(os.environ[env], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def torch_nvcc_flags():
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
        return list(COMMON_NVCC_FLAGS)
    except Exception:  # pragma: no cover - torch without cpp_extension
        return TORCH_NVCC_FLAGS


NVCC = find_nvcc()


def test_there_are_cuda_sources():
    assert CU_FILES, "no .cu file under csrc/"


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda)")
@pytest.mark.parametrize("arch", ARCHS, ids=["sm_80", "sm_90a"])
def test_cuda_sources_compile(arch, tmp_path):
    cmd = [NVCC, "-c", *CU_FILES, "--output-directory", str(tmp_path), "-O3", "-std=c++17",
           "--use_fast_math", '-DMACL_BUILT_WITH_TORCH="nvcc-compile-test"', *torch_nvcc_flags(),
           arch]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, f"nvcc failed:\n{log}"
    ours = [line for line in (proc.stdout + proc.stderr).splitlines()
            if "warning" in line.lower() and "csrc" in line]
    assert not ours, "nvcc warnings in csrc/:\n" + log
    assert len(list(tmp_path.glob("*.o"))) == len(CU_FILES)
