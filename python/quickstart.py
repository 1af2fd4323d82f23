"""Quick start: swap the MACL loss into a training loop and check it against the reference.

    python python/quickstart.py [--steps 20] [--batch-size 256] [--backend auto]

A small MLP encoder learns to map two noisy views of the same synthetic point to nearby
embeddings. Each step logs the loss, MACL's adaptive temperature and the alignment it is derived
from. At the end the same batch is evaluated with the full-matrix reference to show that the
fused backend gives the same loss and gradients.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import macl_kernels as mk


def two_views(points: torch.Tensor, noise: float = 0.3):
    return points + noise * torch.randn_like(points), points + noise * torch.randn_like(points)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--input-dim", type=int, default=32)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    encoder = nn.Sequential(
        nn.Linear(args.input_dim, 128), nn.ReLU(), nn.Linear(128, args.embed_dim)
    )
    criterion = mk.MACLLoss(temperature=0.1, alpha=0.5, A_0=0.0, backend=args.backend)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    data = torch.randn(4096, args.input_dim)

    start = time.perf_counter()
    for step in range(args.steps):
        batch = data[torch.randint(0, len(data), (args.batch_size,))]
        view1, view2 = two_views(batch)
        loss = criterion(encoder(view1), encoder(view2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  "
                  f"tau {criterion.last_temperature.item():.4f}  "
                  f"alignment {criterion.last_alignment.item():.4f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.2f} s "
          f"(backend {args.backend!r}, batch {args.batch_size})")

    # Same batch, fused backend vs the full-matrix reference, in float64.
    view1, view2 = (v.double() for v in two_views(data[: args.batch_size]))
    encoder = encoder.double()
    results = {}
    for backend in (args.backend, "reference"):
        encoder.zero_grad()
        loss = mk.macl_loss(encoder(view1), encoder(view2), backend=backend)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in encoder.parameters()])
        results[backend] = (loss.detach(), grads)
    (loss_a, grad_a), (loss_r, grad_r) = results[args.backend], results["reference"]
    grad_err = ((grad_a - grad_r).norm() / grad_r.norm()).item()
    print(f"float64 check vs reference: |loss diff| {abs(loss_a - loss_r).item():.2e}, "
          f"relative gradient error {grad_err:.2e}")
    return 0 if grad_err < 1e-9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
