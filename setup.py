"""Build and install macl-kernels.

The package is pure Python today. Native backends (the C++/OpenMP CPU kernels and the CUDA C++
kernels, see csrc/README.md) are added here as torch extensions when their sources exist, so that
``pip install --no-build-isolation -e .`` keeps being the one install command.
"""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def long_description() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


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
    entry_points={"console_scripts": ["macl-kernels = macl_kernels.cli:main"]},
)
