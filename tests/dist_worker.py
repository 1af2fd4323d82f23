"""One rank of the multi-process tests in test_distributed.py (gloo over loopback).

    python tests/dist_worker.py RANK WORLD_SIZE RENDEZVOUS_FILE OUT_DIR

Every rank builds the same global batch (fixed seed), keeps its own rows, computes every loss
case with ``gather_distributed=True`` and saves its losses and local gradients to
``OUT_DIR/rank{RANK}.pt``; it also runs one DDP step of a small model with the MACL loss.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

from macl_kernels import distributed as mk_distributed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_cases  # noqa: E402


def main() -> int:
    rank, world_size = int(sys.argv[1]), int(sys.argv[2])
    rendezvous, out_dir = sys.argv[3], sys.argv[4]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        results = {}
        z1, z2, scale = dist_cases.global_batch()
        n = z1.shape[0] // world_size
        local = slice(rank * n, (rank + 1) * n)
        for key, run in dist_cases.cases():
            results[key] = run(z1[local], z2[local], scale, gather_distributed=True)
        results["ddp"] = dist_cases.ddp_step(local, world_size)
        results["clip_module"] = dist_cases.clip_module_cases(z1[local], z2[local], scale,
                                                              rank, world_size)
        negatives = dist_cases.rank_negatives(world_size)
        k = dist_cases.NEGATIVES_PER_RANK
        for backend in dist_cases.BACKENDS:
            results[("bank", backend)] = dist_cases.bank_run(local, backend)
            results[("moco_macl", backend)] = dist_cases.moco_macl_run(
                z1[local], z2[local], backend, gather_distributed=True)
            results[("negatives", backend)] = dist_cases.negatives_run(
                z1[local], z2[local], negatives[rank * k:(rank + 1) * k], backend,
                gather_distributed=True)
        results["siglip_module"] = dist_cases.siglip_module_cases(z1[local], z2[local], scale,
                                                                  rank, world_size)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        mk_distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
