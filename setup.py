"""Build and install macl-kernels.

    pip install --no-build-isolation -e .      # (make install does this inside .venv)

Builds, as torch extensions:
- ``macl_kernels._C_cpu`` (csrc/cpu, the fused C++/OpenMP kernels of backend "cpu"): always.
- ``macl_kernels._C_cuda`` (csrc/cuda, backend "cuda"): when this torch is a CUDA build and the
  CUDA sources are present; skipped otherwise, and ``available_backends()`` says why.

``--no-build-isolation`` matters: the extensions must be compiled against the torch that will
import them. Environment: ``MACL_CPU_ARCH_FLAGS`` (default ``-march=native``: the extension is
built on the machine that runs it) and ``MACL_CUDA_ARCH_FLAGS`` override the target flags.
"""

import os
import shlex

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def long_description() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


def extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # metadata-only operations (no torch yet): pure-Python install
        return [], {}
    torch_version = f'-DMACL_BUILT_WITH_TORCH="{torch.__version__}"'
    cpu_flags = shlex.split(os.environ.get("MACL_CPU_ARCH_FLAGS", "-march=native"))
    exts = [
        CppExtension(
            "macl_kernels._C_cpu",
            ["csrc/cpu/macl_cpu.cpp"],
            # -fno-trapping-math lets GCC turn the float selects of the exp/max loops into
            # blends and vectorise them (2.5x on the forward); the kernels never rely on
            # floating-point exceptions. (Not -ffast-math: -inf marks excluded pairs.)
            extra_compile_args=["-O3", "-fopenmp", "-fno-trapping-math", "-std=c++20",
                                torch_version, *cpu_flags],
            extra_link_args=["-fopenmp"],
        )
    ]
    cuda_sources = ["csrc/cuda/macl_cuda.cu", "csrc/cuda/binding.cpp"]
    if torch.version.cuda and all(os.path.exists(os.path.join(HERE, s)) for s in cuda_sources):
        cuda_arch = shlex.split(os.environ.get(
            "MACL_CUDA_ARCH_FLAGS",
            "-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a"))
        exts.append(
            CUDAExtension(
                "macl_kernels._C_cuda",
                cuda_sources,
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++20", torch_version],
                    "nvcc": ["-O3", "-std=c++17", "--use_fast_math", torch_version, *cuda_arch],
                },
            )
        )
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = extensions()

setup(
    name="macl-kernels",
    version="0.1.0",
    description="Fused, memory-efficient Model-Aware Contrastive Learning (MACL) and sibling "
    "contrastive losses for PyTorch",
    long_description=long_description(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["macl_kernels", "macl_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "bench": ["matplotlib", "tqdm"],
        "test": ["pytest"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["macl-kernels = macl_kernels.cli:main"]},
)
