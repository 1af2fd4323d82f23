"""The chunked pure-PyTorch backend: what is specific to it. Its primitive is tested with every
other backend's in test_primitive.py and its losses in test_losses.py; here, the chunking (rows per
chunk from ``TILE_ELEMENTS``, chunks that do not divide the rows) and its O((M + K) D) memory
promise (docs/math.md#the-primitive, "Tiled evaluation")."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import (
    F64_RTOL, LAYOUT_LOSSES, LAYOUTS, LOSS_LAYOUTS, assert_rel_close, dense_negative_lse,
    loss_and_grads, loss_case, make_pair, upstream_like,
)
from macl_kernels.primitive import ops as _ops
from macl_kernels.primitive.protocol import LogitMap
from macl_kernels.primitive.backends import torch_chunked as TC


@pytest.mark.parametrize("chunk", [1, 3, 5, 64])
@pytest.mark.parametrize("logit_map", list(LogitMap), ids=["scaled", "artanh"])
@pytest.mark.parametrize("symmetric,m,k,d", [
    (True, 14, 14, 7), (True, 4, 4, 3), (False, 10, 13, 33), (False, 2, 2, 1), (False, 7, 7, 5),
])
def test_chunks_of_a_few_rows(monkeypatch, symmetric, m, k, d, logit_map, chunk):
    """The op with the backend's chunk forced to ``chunk`` rows (1, ragged, more than M) against
    the dense oracle."""
    monkeypatch.setattr(TC, "TILE_ELEMENTS", chunk * k)
    assert TC.default_chunk(m, k) == min(m, chunk)
    g = torch.Generator().manual_seed(m + k + d)
    cand = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=torch.float64),
                                         dim=1).requires_grad_(True)
    if symmetric:
        anchors, candidates, self_index = cand, None, torch.arange(m)
        pos_index = (torch.arange(m) + m // 2) % m
    else:
        anchors = torch.nn.functional.normalize(
            torch.randn(m, d, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
        candidates, self_index = cand, None
        pos_index = torch.randperm(k, generator=g)[:m] if m <= k else torch.arange(m) % k
    artanh = logit_map is LogitMap.ARTANH
    inv_temp = None if artanh else (1 / (0.05 + torch.rand(m, generator=g, dtype=torch.float64))
                                    ).requires_grad_(True)
    kw = dict(logit_map=logit_map, artanh_scale=2.0 if artanh else 0.0,
              artanh_eps=1e-6 if artanh else 0.0)
    leaves = [t for t in (anchors, candidates, inv_temp) if t is not None]
    got = _ops.negative_lse("torch", anchors, candidates, inv_temp, pos_index, self_index, **kw)
    want = dense_negative_lse(anchors, candidates, inv_temp, pos_index, self_index, **kw)
    assert_rel_close(got, want, F64_RTOL, "lse_neg")
    up = upstream_like(want)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(got, leaves, up),
                                   torch.autograd.grad(want, leaves, up))):
        assert_rel_close(a, b, F64_RTOL, f"grad of input {i}")


@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("logit_map", list(LogitMap), ids=["scaled", "artanh"])
def test_both_directions_in_chunks(monkeypatch, logit_map, chunk):
    """Both directions with the chunk forced to ``chunk`` rows: the columns' statistics are
    merged over chunks (1 row, ragged, one chunk), against the rows' and the columns' dense
    problems; the columns' positives and selves fall in every chunk."""
    from test_primitive import dense_both_directions, make_both_directions_problem

    m, k = 9, 11
    monkeypatch.setattr(TC, "TILE_ELEMENTS", chunk * k)
    tensors = make_both_directions_problem(m, k, 5, logit_map, seed=chunk, with_self=True)
    anchors, candidates, inv_temp = (None if t is None else t.clone().requires_grad_(True)
                                     for t in tensors[:3])
    artanh = logit_map is LogitMap.ARTANH
    kw = dict(logit_map=logit_map, artanh_scale=2.0 if artanh else 0.0,
              artanh_eps=1e-6 if artanh else 0.0)
    leaves = [t for t in (anchors, candidates, inv_temp) if t is not None]
    got = _ops.negative_lse("torch", anchors, candidates, inv_temp, *tensors[3:],
                            both_directions=True, **kw)
    want = dense_both_directions(anchors, candidates, inv_temp, *tensors[3:], **kw)
    assert_rel_close(got, want, F64_RTOL, "lse_neg")
    up = upstream_like(want)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(got, leaves, up),
                                   torch.autograd.grad(want, leaves, up))):
        assert_rel_close(a, b, F64_RTOL, f"grad of input {i}")


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Make the public API use chunks of a few rows; records the chunks it picked."""
    picked = []
    original = TC.default_chunk

    def spy(num_rows, num_candidates):
        chunk = original(num_rows, num_candidates)
        picked.append((num_rows, num_candidates, chunk))
        return chunk

    monkeypatch.setattr(TC, "TILE_ELEMENTS", 80)
    monkeypatch.setattr(TC, "default_chunk", spy)
    return picked


@pytest.mark.parametrize("n,d", [(13, 33)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", LAYOUT_LOSSES)
def test_losses_use_the_tile_size(tiny_tiles, name, layout, n, d):
    """The losses go through the chunking: the chunks follow TILE_ELEMENTS, and some do not
    divide the rows. (The values: test_losses.py's assembly test, under the same tiny
    tiles.)"""
    z1, z2 = make_pair(n, d, seed=n * d)
    fn, kw = loss_case(name, layout)
    loss_and_grads(fn, z1, z2, reduction="none", backend="torch", **kw)
    assert tiny_tiles and all(chunk <= max(1, 80 // k) for _, k, chunk in tiny_tiles)
    assert any(rows % chunk for rows, _, chunk in tiny_tiles)  # chunks not dividing the rows


def test_default_tile_is_not_tiny():
    assert TC.default_chunk(8, 8) == 8
    assert TC.default_chunk(1 << 20, 1 << 20) == max(1, TC.TILE_ELEMENTS >> 20)


# --------------------------------------------------------------------------------------------
# Memory shape: never an M x K tensor (docs/math.md#the-primitive)
# --------------------------------------------------------------------------------------------

MEM_N, MEM_D = 32, 8  # 2N = 64 rows, 4 per 256-element tile


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any operator produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _run_recording(name, layout, backend):
    z1, z2 = make_pair(MEM_N, MEM_D, seed=39)
    fn, kw = loss_case(name, layout)
    if name == "clip":
        kw["logit_scale"] = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    saved = []
    with _LargestOutput() as mode:
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = fn(z1, z2, backend=backend, **kw)
        loss.backward()
    return saved, mode.largest


@pytest.mark.parametrize("name,layout", LOSS_LAYOUTS)
def test_torch_backend_never_materialises_similarity_matrix(monkeypatch, name, layout):
    monkeypatch.setattr(TC, "TILE_ELEMENTS", 256)
    # The smallest similarity block of any layout is N x N (2n: 2N x 2N; cross_sym: 2 of N x N).
    limit = MEM_N * MEM_N
    saved, largest = _run_recording(name, layout, "torch")
    assert saved, "saved_tensors_hooks saw nothing: the check would be vacuous"
    assert max(saved) < limit, f"a saved tensor has {max(saved)} >= N*N = {limit} elements"
    assert largest < limit, f"an operator produced {largest} >= N*N = {limit} elements"
    assert largest <= max(256, 2 * MEM_N * MEM_D)


def test_memory_check_detects_the_reference():
    """Positive control: the full-matrix reference does save and build M x K tensors."""
    saved, largest = _run_recording("macl", "2n", "reference")
    assert max(saved) >= (2 * MEM_N) ** 2
    assert largest >= (2 * MEM_N) ** 2
