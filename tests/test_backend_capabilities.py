"""Backend capabilities as data (``Capabilities``) and the one ``not_supported_reasons`` that
``auto``, an explicit backend, ``Backend.check``, ``available_backends`` and ``info`` use."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import macl_kernels as mk
from conftest import make_pair
from macl_kernels.primitive import backends
from macl_kernels.primitive import ops as _ops
from macl_kernels.primitive.backends import kernel_backend
from macl_kernels.primitive.protocol import (BUILD, DEVICE, DTYPE, OPTION, WIDTH, Backend,
                                             Capabilities, LogitMap, Options, Reason,
                                             RowReduction, missing_build)
from macl_kernels.tools.report import info_lines

CPU = torch.device("cpu")


@pytest.fixture
def capped(monkeypatch):
    """The torch backend declaring narrower capabilities than it has (D <= 8, float64 only, no
    both-directions, no labels): every refusal comes from the data alone."""
    impl = kernel_backend("torch")
    monkeypatch.setattr(impl, "capabilities", dataclasses.replace(
        impl.capabilities, dtypes=(torch.float64,), max_d=8, both_directions=False,
        labels=False, row_reductions=(RowReduction.LSE,)))
    return impl


def test_every_kernel_backend_declares_its_capabilities():
    for name in backends.KERNEL_MODULES:
        impl = kernel_backend(name)
        assert isinstance(impl, Backend) and isinstance(impl.capabilities, Capabilities), name
        # No backend relies on ops to split a both-directions problem: there is no fallback.
        assert impl.capabilities.both_directions, name
        assert impl.capabilities.build in ("python", "aot", "aot+jit"), name
        assert backends.capabilities(name) is impl.capabilities
    assert backends.capabilities("reference") is None


def test_reasons_from_the_data(capped):
    assert capped.not_supported_reasons(CPU, torch.float64, 8, Options()) == []
    reasons = capped.not_supported_reasons(
        torch.device("meta"), torch.float32, 9,
        Options(both_directions=True, labels=True, row_reduction=RowReduction.SOFTPLUS))
    assert [r.kind for r in reasons] == [DTYPE, WIDTH, OPTION, OPTION, OPTION]
    text = "; ".join(reasons)
    assert "float64" in text and "D <= 8, got D = 9" in text
    assert "both_directions" in text and "label mask" in text and "SOFTPLUS" in text
    assert all(isinstance(r, Reason) and r.strip() for r in reasons)
    # None: not known, not checked.
    assert capped.not_supported_reasons(CPU) == []


def test_device_types_are_data(monkeypatch):
    impl = kernel_backend("torch")
    monkeypatch.setattr(impl, "capabilities",
                        dataclasses.replace(impl.capabilities, devices=("cuda",)))
    (reason,) = impl.not_supported_reasons(CPU)
    assert reason.kind == DEVICE and "CUDA tensors only" in reason and reason.error is RuntimeError


def test_check_raises_the_reasons_error_type(capped):
    z = torch.randn(6, 9, dtype=torch.float64)
    pos = torch.arange(6).roll(1)
    with pytest.raises(ValueError, match="D <= 8"):
        _ops.negative_lse("torch", z, None, torch.ones(6, dtype=torch.float64), pos, None)
    with pytest.raises(TypeError, match="computes in float64, got torch.float32"):
        _ops.negative_lse("torch", z[:, :8].float(), None, torch.ones(6), pos, None)


def test_a_backend_without_both_directions_is_refused_not_emulated(capped):
    """The two-direction fallback of ops is gone: a backend that declares no both-directions
    support gets a clear ValueError naming it."""
    a, c = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="both_directions"):
        _ops.negative_lse("torch", a, c, torch.ones(8, dtype=torch.float64),
                          torch.full((8,), -1), None, both_directions=True)


def test_auto_and_an_explicit_backend_use_the_same_reasons(capped):
    # auto passes over nothing here ("torch" is the fallback), an explicit request is refused
    # with the reason and its error type.
    with pytest.raises(ValueError, match="backend='torch' is not usable on cpu: .*D <= 8"):
        backends.resolve_backend("torch", CPU, 9, torch.float64)
    with pytest.raises(TypeError, match="computes in float64"):
        backends.resolve_backend("torch", CPU, 4, torch.float32)
    # Half inputs are upcast to float32 by the losses: that is the dtype checked.
    assert backends.not_supported_reasons("torch", CPU, torch.bfloat16, 4)[0].kind == DTYPE
    z1, z2 = make_pair(4, 9, seed=0)
    with pytest.raises(ValueError, match="D <= 8"):
        mk.macl_loss(z1, z2, backend="torch")


def test_auto_passes_over_a_backend_by_its_reasons(monkeypatch):
    if backends.not_supported_reasons("cpu", CPU):
        pytest.skip("the cpu backend is not usable here")
    impl = kernel_backend("cpu")
    monkeypatch.setattr(impl, "capabilities", dataclasses.replace(impl.capabilities, max_d=8))
    assert backends.resolve_backend("auto", CPU, 8, torch.float32) == "cpu"
    assert backends.resolve_backend("auto", CPU, 9, torch.float32) == "torch"
    assert backends.resolve_backend("auto", CPU, 9, torch.float64) == "torch"


def test_available_backends_and_info_are_the_reasons():
    for device in (None, CPU, torch.device("meta")):
        for name, reason in mk.available_backends(device).items():
            reasons = backends.not_supported_reasons(name, device)
            assert reason == ("; ".join(reasons) if reasons else None), name
    lines = info_lines()
    for name, reason in mk.available_backends().items():
        assert f"  {name}: {'usable' if reason is None else 'unusable: ' + reason}" in lines
    caps = kernel_backend("cpu").capabilities
    assert f"    computes: {caps.summary()}" in lines
    state = backends.build_state("cpu")
    assert any(line.startswith("    build: ") and state.detail in line for line in lines)
    assert backends.build_state("torch") is None


def test_missing_build_is_only_about_the_build():
    assert missing_build([Reason("not built", BUILD)])
    assert not missing_build([])
    assert not missing_build([Reason("not built", BUILD), Reason("CUDA only", DEVICE)])
    with pytest.raises(ValueError, match="kind"):
        Reason("x", "nonsense")


def test_options_of_a_problem():
    from macl_kernels.primitive.protocol import Problem

    z = torch.randn(4, 3)
    p = Problem(z, None, torch.ones(4), torch.arange(4), None, LogitMap.SCALED,
                operand_dtype=torch.bfloat16, anchor_labels=torch.arange(4))
    assert Options.of(p) == Options(LogitMap.SCALED, RowReduction.LSE, True, False, True,
                                     torch.bfloat16)
