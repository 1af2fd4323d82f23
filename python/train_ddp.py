"""Distributed (DDP) contrastive training with the MACL loss over the global batch.

    torchrun --nproc_per_node=2 python/train_ddp.py            # 2 CPU ranks on gloo
    torchrun --nproc_per_node=2 python/train_ddp.py --check    # + compare with one process
    python python/train_ddp.py                                  # one process, same code

Each rank encodes its share of the batch; ``MACLLoss(gather_distributed=True)`` gathers every
rank's embeddings as candidates (the gather's backward all-reduces), offsets each rank's
positives, and takes MACL's alignment ``A`` over the global batch, so that DDP's averaged
gradients are exactly those of one process on the whole batch. ``--check`` verifies that on the
first step: rank 0 recomputes the step on the concatenated batch in one process.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import macl_kernels as mk


def make_encoder(input_dim: int, embed_dim: int) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    return nn.Sequential(nn.Linear(input_dim, 128), nn.ReLU(), nn.Linear(128, embed_dim))


def global_batch(step: int, batch_size: int, input_dim: int):
    """Both views of the global batch of ``step`` (every rank draws the same, keeps its rows)."""
    g = torch.Generator().manual_seed(1000 + step)
    points = torch.randn(batch_size, input_dim, generator=g)
    return (points + 0.3 * torch.randn(points.shape, generator=g),
            points + 0.3 * torch.randn(points.shape, generator=g))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=512, help="global batch (rows per view)")
    parser.add_argument("--input-dim", type=int, default=32)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--check", action="store_true",
                        help="check the first step against a single process on the whole batch")
    args = parser.parse_args(argv)

    distributed = "WORLD_SIZE" in os.environ  # launched by torchrun
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    if args.batch_size % world_size:
        raise SystemExit(f"--batch-size {args.batch_size} must divide by {world_size} ranks")
    local_n = args.batch_size // world_size
    local = slice(rank * local_n, (rank + 1) * local_n)

    encoder = make_encoder(args.input_dim, args.embed_dim)
    model = nn.parallel.DistributedDataParallel(encoder) if distributed else encoder
    criterion = mk.MACLLoss(gather_distributed=True, backend=args.backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    start = time.perf_counter()
    for step in range(args.steps):
        view1, view2 = (v[local] for v in global_batch(step, args.batch_size, args.input_dim))
        # One forward for both views: DDP expects one forward per backward.
        out = model(torch.cat([view1, view2]))
        loss = criterion(out[:local_n], out[local_n:])
        optimizer.zero_grad()
        loss.backward()
        if step == 0 and args.check:
            check_first_step(encoder, args, rank)
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  rank-0 loss {loss.item():.4f}  "
                  f"tau {criterion.last_temperature.item():.4f}  "
                  f"A {criterion.last_alignment.item():.4f}")
    if rank == 0:
        print(f"{args.steps} steps, {world_size} rank(s), global batch {args.batch_size}: "
              f"{time.perf_counter() - start:.2f} s")
    if distributed:
        # Not plain dist.destroy_process_group(): see mk.distributed.shutdown (a gloo teardown
        # race that hangs about one run in two with torch 2.13).
        mk.distributed.shutdown(model)
    return 0


def check_first_step(encoder: nn.Module, args, rank: int) -> None:
    """Rank 0: DDP's averaged gradients vs one process on the concatenated batch."""
    if rank != 0:
        return
    reference = make_encoder(args.input_dim, args.embed_dim)
    view1, view2 = global_batch(0, args.batch_size, args.input_dim)
    out = reference(torch.cat([view1, view2]))
    n = args.batch_size
    mk.MACLLoss(backend=args.backend)(out[:n], out[n:]).backward()
    worst = max(((p.grad - q.grad).norm() / q.grad.norm()).item()
                for p, q in zip(encoder.parameters(), reference.parameters()))
    print(f"check: DDP gradients vs single process, worst relative difference {worst:.2e}")


if __name__ == "__main__":
    raise SystemExit(main())
