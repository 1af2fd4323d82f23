"""The accuracy of CLIP's loss and gradients (image features, text features, logit scale) on the
fast backends against the float64 reference: relative errors ``||got - want|| / ||want||``, the
reference run on the same rounded inputs (docs/math.md#tolerances). CPU only.

    python bench/clip_accuracy.py --n 4096,2048 --dim 128,512 --backends cpu,torch
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from macl_kernels import functional as F  # noqa: E402
from macl_kernels.tools.cases import CLIP_SCALE, make_views, relative_error  # noqa: E402


def clip_step(z1, z2, dtype, backend):
    image = z1.to(dtype).requires_grad_(True)
    text = z2.to(dtype).requires_grad_(True)
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(CLIP_SCALE, dtype=scale_dtype, requires_grad=True)
    loss = F.clip_loss(image, text, scale, backend=backend)
    loss.backward()
    return loss.detach(), image.grad, text.grad, scale.grad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="4096")
    p.add_argument("--dim", default="128")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--backends", default="cpu,torch")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| N | D | backend | inputs | loss | d image | d text | d logit_scale |")
    print("|---|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.n.split(",")]:
        for d in [int(x) for x in args.dim.split(",")]:
            z1, z2, _ = make_views(n, d, dtype=torch.float64)
            for dtype_name in args.dtypes.split(","):
                dtype = getattr(torch, dtype_name)
                # The reference sees the inputs rounded to the tested dtype, in float64.
                want = clip_step(z1.to(dtype).double(), z2.to(dtype).double(), torch.float64,
                                 "reference")
                for backend in args.backends.split(","):
                    got = clip_step(z1, z2, dtype, backend)
                    errs = " | ".join(f"{relative_error(a, b):.1e}" for a, b in zip(got, want))
                    print(f"| {n} | {d} | {backend} | {dtype_name} | {errs} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
