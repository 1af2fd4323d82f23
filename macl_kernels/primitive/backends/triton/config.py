"""The Triton backend's configuration: whether Triton imports and in which mode its kernels are
decorated (compiled, or Triton's CPU interpreter with ``TRITON_INTERPRET=1``), the switches
(``AUTOTUNE``, ``USE_SYMMETRY``, the interpreter's blocks), the precision classes and the GPU
shape tables (``SHAPES``) with the rules read from them.

Pure Python: nothing here needs a GPU, and the launcher (``launch.py``), the backend glue
(``backend.py``) and the kernel inventory (``macl_kernels.tools.inventory``) read the same tables.
The switches are read as attributes of this module at call time (``config.AUTOTUNE``), so that
a benchmark or a test sets them here, once, for every reader.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

try:  # whether Triton imports at all (kernels.py and launch.py import it for their own use)
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - exercised only where triton is missing
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Triton decides at decoration time whether a kernel is compiled or interpreted, so the mode the
# kernels of kernels.py were built in is the environment's at import (this module is imported
# first, before them).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Under the interpreter every program runs in NumPy, one at a time, and each tile operation costs
# a Python-level dispatch: one fixed config, no autotuning. 32 x 32 runs MACL 2n at N = 64, D = 32
# forward+backward in ~0.3 s on the 2-core CI machine (16 x 16: ~1.8 s; 64 x 64: ~0.14 s, but then
# small test batches would fit one tile and the multi-tile paths go untested). The test file
# lowers it to 16, tl.dot's minimum, to cross many tile edges at small sizes.
INTERPRETER_BLOCK_M = 32
INTERPRETER_BLOCK_N = 32

# Whole-D tiles (``BLOCK_D`` = next power of two >= max(D, 16)) live in registers/shared memory;
# above this the accumulators would not fit any tile shape, so we refuse rather than spill badly.
# On a GPU the shape tables (``SHAPES``) cap the width lower for some precisions (float32 128,
# float64 512); the interpreter accepts every width up to this.
MAX_D = 1024

# Exploit layout 2n's symmetric S in backward ((dL_dS + dL_dS^T) U in one pass). A switch only so
# that the benchmark can measure what it buys; there is no reason to turn it off otherwise.
USE_SYMMETRY = True

# GPU only: pick BLOCK_M/BLOCK_N/num_warps/num_stages by triton.autotune (keyed on BLOCK_D, the
# flags and the dtypes; the first call per key benchmarks every fitting config). Off
# (MACL_TRITON_AUTOTUNE=0): one default shape per D, compiled once - for test runs.
AUTOTUNE = os.environ.get("MACL_TRITON_AUTOTUNE", "1") != "0"


def unavailable_reason(device: Optional[torch.device]) -> Optional[str]:
    """``None`` when the Triton kernels can run on ``device``, else why not and what to do."""
    if IMPORT_ERROR is not None:
        return (f"triton could not be imported ({IMPORT_ERROR}); install it with "
                f"`pip install triton` (it ships with CUDA builds of PyTorch on Linux)")
    if device is not None and device.type == "cuda":
        if INTERPRET:
            return ("the Triton kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 "
                    "when macl_kernels' triton backend was imported); unset it for CUDA tensors")
        return None
    if device is None and not INTERPRET and torch.cuda.is_available():
        return None  # "usable here": on this machine's GPU
    if device is None or device.type == "cpu":
        if INTERPRET:
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("TRITON_INTERPRET=1 was set after macl_kernels' triton backend was imported; "
                    "set it before importing macl_kernels to run the kernels on the CPU")
        return ("the Triton kernels need a CUDA device; on the CPU they run only in Triton's "
                "interpreter (slow, for testing): set TRITON_INTERPRET=1 before importing "
                "macl_kernels, or use backend='cpu' / 'torch'")
    return f"the triton backend runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}"


# --------------------------------------------------------------------------------------------
# Precision classes and the GPU shape rules
# --------------------------------------------------------------------------------------------

# How a problem's operands reach ``tl.dot``: (operand dtype, accumulator dtype, DOT_PRECISION).
# float32 at torch's default matmul precision ("highest") runs 3xTF32 (each operand split into a
# tf32 high part and a tf32 remainder, three tensor-core products, float32 accumulation: close to
# float32's own rounding, see the README's GPU section). An "ieee" float32 dot is lowered to FMAs
# that hold whole operand tiles in registers and spills 7-17 KB per thread on sm_90 at every
# tile shape that is worth running (bench/results/gpu_sm90_compiled_resources/).
PRECISIONS = {
    "fp32": (torch.float32, torch.float32, "tf32x3"),
    "fp32-tf32": (torch.float32, torch.float32, "tf32"),  # matmul precision "high"/"medium"
    "bf16": (torch.bfloat16, torch.float32, "ieee"),  # DOT_PRECISION is moot for half operands
    "fp16": (torch.float16, torch.float32, "ieee"),
    "fp64": (torch.float64, torch.float64, "ieee"),
}


def precision_of(op_dtype: torch.dtype, dot_precision: str) -> str:
    """The ``PRECISIONS`` name of ``op_dtype`` operands dotted at ``dot_precision`` (the
    autotuner's pruning reads both from a launch's arguments)."""
    if op_dtype == torch.float32:
        return "fp32" if dot_precision == "tf32x3" else "fp32-tf32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[op_dtype]


def precision_class(op_dtype: torch.dtype) -> str:
    """The ``PRECISIONS`` name of operands of ``op_dtype`` under the current float32 matmul
    precision."""
    if op_dtype == torch.float32:
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "fp32-tf32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[op_dtype]


def block_d_of(d: int) -> int:
    """The tile width holding a whole row of width ``d``: a power of two, at least 16."""
    return max(16, 1 << (max(int(d), 1) - 1).bit_length())


# Tile shapes (BLOCK_M, BLOCK_N, num_warps, num_stages) per precision class, kernel kind and
# width, with the shared memory (bytes) the compiled kernel uses at the width's largest BLOCK_D
# (the most over flag sets and Triton 3.6 / 3.9): ``(largest BLOCK_D, ((shape, shared), ...))``
# in increasing width. The first shape of a list is the default (AUTOTUNE off), all of them the
# autotuner's candidates. Measured, not modelled (``macl-kernels kernels --arch sm_90``,
# bench/results/gpu_sm90_compiled_resources/): every shape listed compiles, under Triton 3.6 and
# 3.9, with at most 1 KB of spill per thread, within an H100/H200's 232,448 B of shared memory
# per block and within its shared figure here (tests/test_kernel_inventory.py checks both on the
# compiled kernels). Beyond a list's last width there is no such shape: the backend refuses the
# width (``auto`` passes over it). Kind "forward": BLOCK_M rows resident, BLOCK_N streamed;
# "candidates": BLOCK_N resident, BLOCK_M streamed. Every kernel of a kind shares its table (the
# both-directions and softplus kernels were measured within it at each precision's widest
# default shape; the label mask's int64 loads add up to 512 B of shared memory, measured at the
# defaults only: bench/results/gpu_sm90_compiled_resources/README.md, "After the merge").
SHAPES = {
    ("fp32", "forward"): (
        (64, (((64, 32, 4, 2), 57344), ((32, 32, 4, 2), 24576))),
        (128, (((32, 32, 8, 2), 49408), ((32, 32, 4, 2), 49152), ((64, 32, 8, 2), 114688)))),
    ("fp32", "candidates"): (
        (64, (((64, 32, 4, 2), 33792), ((32, 32, 4, 2), 25088))),
        (128, (((64, 32, 8, 2), 67328), ((32, 32, 4, 2), 49792), ((32, 32, 8, 2), 49792)))),
    ("fp32-tf32", "forward"): (
        (128, (((64, 32, 4, 2), 65536), ((64, 64, 4, 2), 98304), ((64, 64, 8, 2), 98304))),
        (256, (((32, 32, 4, 2), 98304), ((64, 32, 8, 2), 131072), ((64, 64, 8, 2), 196608))),
        (512, (((32, 32, 8, 1), 196608),)),
        (1024, (((16, 16, 4, 1), 163840),))),
    ("fp32-tf32", "candidates"): (
        (128, (((64, 32, 4, 2), 66560), ((64, 64, 4, 2), 99328), ((64, 64, 8, 2), 99328))),
        (256, (((64, 32, 8, 2), 165120), ((32, 32, 4, 2), 98816), ((64, 64, 8, 2), 197632))),
        (512, (((32, 32, 8, 1), 196608),)),
        (1024, (((16, 16, 4, 1), 163840),))),
    ("bf16", "forward"): (
        (128, (((64, 64, 4, 2), 49152), ((128, 64, 8, 2), 65536), ((64, 64, 4, 3), 49152),
               ((64, 128, 8, 2), 81920))),
        (256, (((64, 32, 4, 2), 65536), ((64, 64, 8, 2), 98304), ((64, 64, 4, 2), 98304),
               ((128, 64, 8, 2), 131072))),
        (512, (((32, 32, 8, 1), 98304), ((64, 32, 8, 2), 131072), ((32, 32, 4, 2), 98304))),
        (1024, (((16, 32, 8, 1), 163840), ((32, 32, 8, 1), 196608)))),
    ("bf16", "candidates"): (
        (128, (((64, 64, 4, 2), 50176), ((64, 128, 8, 2), 66560), ((64, 64, 4, 3), 51200),
               ((64, 64, 8, 2), 50176))),
        (256, (((64, 32, 4, 2), 66816), ((64, 64, 8, 2), 99328))),
        (512, (((64, 32, 8, 2), 164864), ((32, 32, 4, 2), 98816), ((32, 32, 8, 1), 98304))),
        (1024, (((32, 16, 8, 1), 163840), ((32, 32, 8, 1), 196608)))),
    ("fp64", "forward"): (
        (128, (((32, 32, 8, 1), 98304), ((16, 32, 4, 1), 81920))),
        (256, (((32, 32, 8, 1), 196608), ((16, 16, 4, 1), 98304))),
        (512, (((16, 16, 8, 1), 196608),))),
    ("fp64", "candidates"): (
        (128, (((32, 32, 8, 1), 98304), ((16, 32, 4, 1), 65536))),
        (256, (((32, 32, 8, 1), 196608), ((16, 16, 4, 1), 98304))),
        (512, (((16, 16, 8, 1), 196608),))),
}
# float16 takes bfloat16's shapes (its tf32 weight GEMMs measured within them).
SHAPES[("fp16", "forward")] = SHAPES[("bf16", "forward")]
SHAPES[("fp16", "candidates")] = SHAPES[("bf16", "candidates")]

# Shared memory per block by compute capability (the opt-in maximum; Triton's limit too).
SHARED_MEMORY_LIMIT = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448,
                       100: 232_448, 120: 101_376}
H100_SHARED_MEMORY = SHARED_MEMORY_LIMIT[90]


def measured_shared_memory(shape, block_d: int, precision: str, kind: str) -> Optional[int]:
    """The shared memory the table records for ``shape`` at ``block_d``'s width (an upper
    bound for every BLOCK_D of that width), or ``None`` when the shape is not listed there."""
    for largest, entries in SHAPES[(precision, kind)]:
        if block_d <= largest:
            return dict(entries).get(tuple(shape))
    return None


def shape_candidates(kind: str, precision: str, block_d: int,
                     shared_limit: int = H100_SHARED_MEMORY) -> list:
    """The measured shapes for this kernel kind, precision and width whose recorded shared
    memory fits ``shared_limit``, default first; empty when there is none (the width is
    refused)."""
    for largest, entries in SHAPES[(precision, kind)]:
        if block_d <= largest:
            return [shape for shape, shared in entries if shared <= shared_limit]
    return []


def max_block_d(precision: str, shared_limit: int = H100_SHARED_MEMORY) -> int:
    """The widest ``BLOCK_D`` up to which every width has a fitting shape of every kernel kind
    (0: none). Up to, not the widest with one: a smaller GPU can lose a width's only shape and
    keep a wider one's (float32 tf32 at BLOCK_D 512 on an A100), and "D <= widest" must hold."""
    widest = 0
    for bd in (16, 32, 64, 128, 256, 512, 1024):
        if not all(shape_candidates(kind, precision, bd, shared_limit)
                   for kind in ("forward", "candidates")):
            break
        widest = bd
    return widest


def device_shared_limit(device: Optional[torch.device] = None) -> int:
    """Shared memory per block on CUDA ``device``: torch's opt-in figure where it has one, else
    by compute capability; an H100's for ``None`` or a device that is not a visible GPU."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return H100_SHARED_MEMORY
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if limit:
        return int(limit)
    return SHARED_MEMORY_LIMIT.get(props.major * 10 + props.minor, 101_376)


