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


def _default_cuda_arch_flags():
    """setup.py's DEFAULT_CUDA_ARCH_FLAGS, read without running setup.py."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                getattr(t, "id", None) == "DEFAULT_CUDA_ARCH_FLAGS" for t in node.targets):
            return ast.literal_eval(node.value).split()
    raise AssertionError("setup.py defines no DEFAULT_CUDA_ARCH_FLAGS")


def test_default_build_embeds_ptx_for_newer_gpus():
    flags = _default_cuda_arch_flags()
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags  # PTX, JIT-compiled on newer GPUs


def test_info_says_which_architectures_the_extension_carries():
    from macl_kernels.tools.report import info_lines

    assert any(line.startswith("cuda extension: ") for line in info_lines())


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda)")
def test_info_reads_the_architectures_of_a_binary(tmp_path):
    """A small shared library built with setup.py's default flags: ``binary_architectures``
    (what ``info`` reports for the extension) finds both cubins and the PTX."""
    from macl_kernels.tools.report import _cuobjdump, binary_architectures

    if _cuobjdump() is None:
        pytest.skip("no cuobjdump (Triton's bundled one, $CUDA_HOME/bin or PATH)")
    source = tmp_path / "scale.cu"
    source.write_text("__global__ void scale(float* x) { x[threadIdx.x] *= 2.0f; }\n")
    library = tmp_path / "libscale.so"
    cmd = [NVCC, "-shared", "-Xcompiler", "-fPIC", "-o", str(library), str(source),
           *_default_cuda_arch_flags()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert binary_architectures(str(library)) == (["sm_80", "sm_90a"], ["compute_90"])
