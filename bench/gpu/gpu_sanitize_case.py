#!/usr/bin/env python
"""A small forward+backward of the GPU backends for compute-sanitizer (memcheck, racecheck):
MACL (layout 2n, the symmetric paths), CLIP (cross blocks) and tfree (the artanh map) at N = 70,
D = 64 (ragged tiles) in float32 and bfloat16, plus float64 for the cuda backend. Prints one line
per call and "sanitize case: ok" at the end; run by bench/gpu/gpu_first_contact.sh as

    compute-sanitizer --tool memcheck --error-exitcode 9 python bench/gpu/gpu_sanitize_case.py cuda
"""

from __future__ import annotations

import os
import sys

import torch

# The repository root (two folders up: bench/gpu/) on the path: runnable from a source checkout.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import macl_kernels as mk  # noqa: E402


def main(backends):
    torch.manual_seed(0)
    for backend in backends:
        dtypes = [torch.float32, torch.bfloat16] + ([torch.float64] if backend == "cuda" else [])
        for dtype in dtypes:
            for name, call in (
                    ("macl 2n", lambda a, b: mk.macl_loss(a, b, backend=backend)),
                    ("clip", lambda a, b: mk.clip_loss(a, b, 14.3, backend=backend)),
                    ("tfree 2n", lambda a, b: mk.tfree_loss(a, b, backend=backend))):
                z1 = torch.randn(70, 64, device="cuda", dtype=dtype, requires_grad=True)
                z2 = torch.randn(70, 64, device="cuda", dtype=dtype, requires_grad=True)
                loss = call(z1, z2)
                loss.backward()
                torch.cuda.synchronize()
                print(f"{backend} {name} {str(dtype)[6:]}: loss {loss.item():.5f}", flush=True)
    print("sanitize case: ok")


if __name__ == "__main__":
    main(sys.argv[1:] or ["cuda"])
