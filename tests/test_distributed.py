"""gather_distributed over torch.distributed: real multi-process runs (gloo over loopback).

docs/math.md#distributed: with each rank holding its rows of the global batch, the mean of the per-rank
losses equals the single-process loss on the concatenated batch, and each rank's gradient on its
rows equals ``world_size`` times the matching rows of the single-process gradient (for
``reduction="sum"``: the per-rank sums add up to the single-process sum and the gradients match
one to one). float64, 1e-9.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dist_cases
import macl_kernels as mk
from conftest import rel_err

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")
TOL = 1e-9
LAUNCH_TIMEOUT_S = 240


def launch(world_size: int, tmp_path):
    """Start ``world_size`` ranks, wait (bounded), return each rank's saved results."""
    rendezvous = tmp_path / "rendezvous"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    procs = [
        subprocess.Popen([sys.executable, WORKER, str(rank), str(world_size), str(rendezvous),
                          str(tmp_path)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for rank in range(world_size)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"world{w}")
def world(request, tmp_path_factory):
    world_size = request.param
    return world_size, launch(world_size, tmp_path_factory.mktemp(f"world{world_size}"))


@pytest.fixture(scope="module")
def single_process():
    z1, z2, scale = dist_cases.global_batch()
    return {key: run(z1, z2, scale, gather_distributed=False) for key, run in dist_cases.cases()}


def _local_rows(rank, world_size):
    n = dist_cases.N_GLOBAL // world_size
    return slice(rank * n, (rank + 1) * n)


@pytest.mark.slow  # the `world` fixture launches the ranks as subprocesses
@pytest.mark.parametrize("key", [key for key, _ in dist_cases.cases()], ids=lambda k: "-".join(k))
def test_ranks_reproduce_the_single_process_loss(world, single_process, key):
    world_size, ranks = world
    backend, loss_name, layout, reduction = key
    expected = single_process[key]
    losses = torch.stack([ranks[r][key][0] for r in range(world_size)])
    combined = losses.mean() if reduction == "mean" else losses.sum()
    assert rel_err(combined, expected[0]) <= TOL
    factor = world_size if reduction == "mean" else 1
    for r in range(world_size):
        rows = _local_rows(r, world_size)
        for got, want, what in zip(ranks[r][key][1:3], expected[1:3], ("dz1", "dz2")):
            assert rel_err(got, factor * want[rows]) <= TOL, f"rank {r} {what}"
    case = dist_cases.LOSS_CASES.get(loss_name)  # None: the label cases (no logit scale)
    if case is not None and case.uses_logit_scale:
        # The replicated scale (CLIP, SigLIP): DDP averages its per-rank gradients.
        dscale = torch.stack([ranks[r][key][3] for r in range(world_size)])
        combined = dscale.mean() if reduction == "mean" else dscale.sum()
        assert rel_err(combined, expected[3]) <= TOL


@pytest.mark.slow  # the `world` fixture launches the ranks as subprocesses
def test_ddp_step_equals_single_process_step(world):
    world_size, ranks = world
    expected = dist_cases.single_process_step()
    for r in range(world_size):
        for got, want in zip(ranks[r]["ddp"], expected):
            assert rel_err(got, want) <= TOL


@pytest.mark.slow  # the `world` fixture launches the ranks as subprocesses
@pytest.mark.parametrize("local_loss,with_grad", dist_cases.CLIP_MODES)
@pytest.mark.parametrize("backend", dist_cases.BACKENDS)
def test_clip_module_open_clip_options(world, local_loss, with_grad, backend):
    world_size, ranks = world
    z1, z2, scale = dist_cases.global_batch()
    for r in range(world_size):
        got = ranks[r]["clip_module"][(local_loss, with_grad, backend)]
        want = dist_cases.clip_module_expected(z1, z2, scale, r, world_size, local_loss,
                                               with_grad)
        for g, w, what in zip(got, want, ("loss", "d image", "d text", "d scale")):
            assert rel_err(g, w) <= TOL, f"rank {r} {what}"


@pytest.mark.slow  # the `world` fixture launches the ranks as subprocesses
@pytest.mark.parametrize("backend", dist_cases.BACKENDS)
def test_memory_bank_with_gather_distributed(world, backend):
    """lightly's NTXentLoss(memory_bank_size, gather_distributed=True): local loss, every rank's
    keys enqueued; the banks of all ranks stay equal."""
    world_size, ranks = world
    for r in range(world_size):
        steps, bank = ranks[r][("bank", backend)]
        want_steps, want_bank = dist_cases.bank_expected(_local_rows(r, world_size))
        for (loss, dq), (want_loss, want_dq) in zip(steps, want_steps):
            assert rel_err(loss, want_loss) <= TOL and rel_err(dq, want_dq) <= TOL
        assert torch.equal(bank, want_bank), f"rank {r}"


@pytest.mark.slow  # the `world` fixture launches the ranks as subprocesses
@pytest.mark.parametrize("backend", dist_cases.BACKENDS)
def test_extra_negatives_are_gathered(world, backend):
    """Each rank's extra negatives join every rank's candidates: the per-rank mean equals the
    single-process loss with all negatives, gradients scale by the world size."""
    world_size, ranks = world
    z1, z2, _ = dist_cases.global_batch()
    negatives = dist_cases.rank_negatives(world_size)
    want = dist_cases.negatives_run(z1, z2, negatives, backend)
    losses = torch.stack([ranks[r][("negatives", backend)][0] for r in range(world_size)])
    assert rel_err(losses.mean(), want[0]) <= TOL
    k = dist_cases.NEGATIVES_PER_RANK
    for r in range(world_size):
        got = ranks[r][("negatives", backend)]
        rows = _local_rows(r, world_size)
        assert rel_err(got[1], world_size * want[1][rows]) <= TOL
        assert rel_err(got[2], world_size * want[2][rows]) <= TOL
        assert rel_err(got[3], world_size * want[3][r * k:(r + 1) * k]) <= TOL


@pytest.mark.slow  # the `world` fixture launches the ranks as subprocesses
@pytest.mark.parametrize("dist_impl", dist_cases.SIGLIP_DIST_IMPLS)
@pytest.mark.parametrize("backend", dist_cases.BACKENDS)
def test_siglip_module_every_dist_impl(world, dist_impl, backend):
    """OpenCLIP's SigLipLoss semantics over ranks (docs/math.md#siglip): local images against
    every rank's texts; the mean of the per-rank losses is the single-process loss of the
    global batch, each rank's feature gradients are ``world_size`` times its rows of the
    single-process ones, and the per-rank scale and bias gradients average to the
    single-process ones - for every dist_impl (they differ in communication only)."""
    world_size, ranks = world
    z1, z2, scale = dist_cases.global_batch()
    want = dist_cases.siglip_module_expected(z1, z2, scale)
    got = [ranks[r]["siglip_module"][(dist_impl, backend)] for r in range(world_size)]
    assert rel_err(torch.stack([g[0] for g in got]).mean(), want[0]) <= TOL
    for r in range(world_size):
        rows = _local_rows(r, world_size)
        for i, what in ((1, "d image"), (2, "d text")):
            assert rel_err(got[r][i], world_size * want[i][rows]) <= TOL, f"rank {r} {what}"
    for i, what in ((3, "d scale"), (4, "d bias")):
        assert rel_err(torch.stack([g[i] for g in got]).mean(), want[i]) <= TOL, what


@pytest.mark.slow  # the `world` fixture launches the ranks as subprocesses
@pytest.mark.parametrize("backend", dist_cases.BACKENDS)
def test_moco_macl_alignment_is_global(world, backend):
    """MACL with a queue and gather_distributed: A is the mean over every rank's query-key pairs
    (the official function would use each rank's own), so the ranks reproduce the single-process
    loss on the whole batch against the same bank."""
    world_size, ranks = world
    z1, z2, _ = dist_cases.global_batch()
    want = dist_cases.moco_macl_run(z1, z2, backend)
    losses = torch.stack([ranks[r][("moco_macl", backend)][0] for r in range(world_size)])
    assert rel_err(losses.mean(), want[0]) <= TOL
    for r in range(world_size):
        rows = _local_rows(r, world_size)
        for got, expected in zip(ranks[r][("moco_macl", backend)][1:], want[1:]):
            assert rel_err(got, world_size * expected[rows]) <= TOL


def test_without_process_group_gather_is_local():
    z1, z2, _ = dist_cases.global_batch()
    for backend in dist_cases.BACKENDS:
        a = mk.macl_loss(z1, z2, gather_distributed=True, backend=backend)
        b = mk.macl_loss(z1, z2, gather_distributed=False, backend=backend)
        assert torch.equal(a, b)


def test_clip_module_needs_a_process_group_for_world_size_above_one():
    z = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        mk.ClipLoss(world_size=2)(z, z, 10.0)
