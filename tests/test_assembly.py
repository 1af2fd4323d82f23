"""The library's shared assembly (``macl_kernels/_assembly.py``): the choices a backend may
exploit are set where the blocks are built (not guessed from tensor identity), and a drop-in's
peer semantics reach only the call they wrap, in the thread that set them."""

from __future__ import annotations

import threading

import pytest
import torch

import macl_kernels as mk
from macl_kernels import _assembly, primitive
from macl_kernels.distributed import DistContext


def _rows(n=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64),
                                          dim=1) for _ in range(2)]


def test_blocks_carry_the_layout_choices():
    u1, u2 = _rows()
    (b,) = _assembly.layout_blocks(u1, u2, "2n")
    assert b.symmetric and not b.both_directions
    (b,) = _assembly.layout_blocks(u1, u2, "2n", negatives=u1[:2].clone())
    assert not b.symmetric
    (b,) = _assembly.layout_blocks(u1, u2, "cross")
    assert not (b.symmetric or b.transposed_next or b.both_directions)
    rows, cols = _assembly.layout_blocks(u1, u2, "cross_sym")
    assert rows.both_directions and rows.transposed_next
    assert not (cols.both_directions or cols.transposed_next)
    rows, _ = _assembly.layout_blocks(u1, u2, "cross_sym", negatives=u1[:2].clone())
    assert rows.transposed_next and not rows.both_directions  # extra negatives: two calls
    labelled = _assembly.with_labels(_assembly.layout_blocks(u1, u2, "cross_sym"),
                                     torch.tensor([0, 1, 0, 2]), "cross_sym")
    assert not any(b.both_directions for b in labelled)  # a label mask: two calls


def test_distributed_cross_sym_blocks_are_two_calls():
    """Distributed, the candidates are every rank's rows: no shared choice is set, even though
    a one-rank gather returns the local tensors themselves."""
    u1, u2 = _rows()
    ctx = DistContext(rank=0, world_size=1, group=None)
    rows, cols = _assembly.layout_blocks(u1, u2, "cross_sym", ctx, gather=lambda x: x)
    assert rows.candidates is cols.anchors and cols.candidates is rows.anchors
    assert not (rows.both_directions or rows.transposed_next)


@pytest.mark.parametrize("negatives", [False, True])
def test_clip_calls_the_primitive_as_the_blocks_say(monkeypatch, negatives):
    calls = []
    original = primitive.negative_lse

    def spy(*args, **kwargs):
        calls.append(kwargs.get("both_directions", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(primitive, "negative_lse", spy)
    u1, u2 = _rows(5, 4, seed=1)
    extra = dict(negatives=u1[:2] + 0.1) if negatives else {}
    mk.clip_loss(u1, u2, 10.0, backend="torch", **extra)
    assert calls == ([False, False] if negatives else [True])


def test_peer_semantics_reach_only_the_wrapped_call():
    z1, z2 = _rows(1, 3)  # one row: no negative; strict refuses, lightly's peer gives 0
    with pytest.raises(ValueError, match="negative"):
        mk.infonce_loss(z1, z2, backend="torch")
    with _assembly.peer_semantics(lenient=True):
        assert torch.isfinite(mk.infonce_loss(z1, z2, temperature=-0.5, backend="torch"))
    assert _assembly.peer() is _assembly.peer()  # back to the public semantics
    assert not _assembly.peer().lenient
    with pytest.raises(ValueError, match="temperature"):
        mk.infonce_loss(*_rows(), temperature=-0.5, backend="torch")


def test_peer_semantics_are_per_thread():
    seen = []
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen.append(_assembly.peer().lenient)
        done.set()

    worker = threading.Thread(target=other)
    worker.start()
    with _assembly.peer_semantics(lenient=True, gather_kind="no_grad"):
        inside.set()
        done.wait(30)
        assert _assembly.peer().lenient and _assembly.peer().gather_kind == "no_grad"
    worker.join()
    assert seen == [False]


def test_macl_stats_come_back_through_the_peer_semantics():
    z1, z2 = _rows(6, 4, seed=2)
    with _assembly.peer_semantics() as call:
        loss = mk.macl_loss(z1, z2, backend="torch")
    tau, alignment = call.stats
    assert torch.isfinite(loss) and tau.dim() == 0 and alignment.dim() == 0
    assert not tau.requires_grad and not alignment.requires_grad
    module = mk.MACLLoss()
    module(z1, z2)
    assert torch.equal(module.last_temperature, tau)
    assert _assembly.peer().stats is None  # the public semantics are never written


def test_bad_gather_kind_is_refused():
    with pytest.raises(ValueError, match="gather_kind"):
        with _assembly.peer_semantics(gather_kind="sometimes"):
            pass


def test_the_reference_imports_nothing_of_the_package():
    """The one oracle shares no helper with the fast path (docs/design.md, module map)."""
    import ast
    from pathlib import Path

    from macl_kernels import reference

    tree = ast.parse(Path(reference.__file__).read_text())
    found = [ast.dump(node) for node in ast.walk(tree)
             if (isinstance(node, ast.ImportFrom) and (node.level or
                                                       (node.module or "").startswith("macl")))
             or (isinstance(node, ast.Import)
                 and any(a.name.startswith("macl") for a in node.names))]
    assert not found, found


@pytest.mark.parametrize("oracle", ["supcon_loss", "supcon_pml_loss", "supcon_macl_loss",
                                    "gcl_loss"])
def test_reference_backend_is_the_oracle(monkeypatch, oracle):
    """``backend="reference"`` of the supervised losses, SupConLoss and GCLoss_v1 is the oracle of
    ``reference.py`` (no dense branch of their own beside the fast path)."""
    from macl_kernels import reference

    calls = []
    original = getattr(reference, oracle)
    monkeypatch.setattr(reference, oracle,
                        lambda *a, **k: calls.append(oracle) or original(*a, **k))
    g = torch.Generator().manual_seed(3)
    features = torch.randn(4, 2, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    if oracle == "supcon_loss":
        mk.supcon_loss(features, labels, backend="reference")
    elif oracle == "supcon_pml_loss":
        mk.SupConLoss(backend="reference")(features[:, 0], labels)
    elif oracle == "supcon_macl_loss":
        mk.supcon_macl_loss(features, labels, backend="reference")
    else:
        mk.GCLoss_v1(N=8, backend="reference")(features[:, 0], features[:, 1],
                                               torch.arange(4))
    assert calls == [oracle]
