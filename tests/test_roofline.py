"""The roofline columns of ``bench`` and ``profile``: the useful-work formulas by hand, the
fractions as ratios, and the matmul-rate measurement on tiny shapes (in-process; no test asserts a
time or a speed). The subprocess runs are in ``test_cli.py`` (marked slow)."""

from __future__ import annotations

import math

import pytest
import torch

from macl_kernels.tools import bench as _bench, profile as _profile, roofline as _roofline


@pytest.mark.parametrize("layout, n, d, phase, macs", [
    # 2n: M = 2N = 4 anchors, S is 4 x 4; forward half of S (symmetry): 0.5 * 16 * 3
    ("2n", 2, 3, "forward", 24), ("2n", 2, 3, "backward", 72), ("2n", 2, 3, "step", 96),
    # cross and cross_sym: S is N x N = 2 x 2; forward S, backward S again + dA + dB
    ("cross", 2, 3, "forward", 12), ("cross", 2, 3, "backward", 36), ("cross", 2, 3, "step", 48),
    ("cross_sym", 2, 3, "forward", 12), ("cross_sym", 2, 3, "step", 48),
    ("2n", 4096, 128, "step", 2 * 8192 ** 2 * 128), ("cross", 4096, 128, "step", 4 * 4096 ** 2 * 128),
])
def test_useful_work_by_hand(layout, n, d, phase, macs):
    assert _roofline.useful_macs(layout, n, d, phase) == macs
    assert _roofline.useful_flops(layout, n, d, phase) == 2 * macs  # 1 multiply-add = 2 flops


@pytest.mark.parametrize("layout", ["2n", "cross", "cross_sym"])
def test_phases_add_up_and_forward_is_at_most_half(layout):
    f, b, s = (_roofline.useful_flops(layout, 8, 5, p) for p in _roofline.ROOFLINE_PHASES)
    assert f + b == s and 0 < f <= s / 2


def test_unknown_layout_or_phase_raises():
    with pytest.raises(ValueError, match="layout"):
        _roofline.useful_flops("3n", 2, 3)
    with pytest.raises(ValueError, match="phase"):
        _roofline.useful_flops("2n", 2, 3, "normalise")


def test_fraction_is_a_ratio():
    assert _roofline.fraction(30.0, 120.0) == 0.25
    assert _roofline.fraction(None, 1.0) is None and _roofline.fraction(1.0, None) is None
    assert _roofline.fraction(1.0, 0.0) is None


def test_matmul_shapes_tile_and_cap():
    assert _roofline.matmul_shapes("2n", 4096, 128) == ((256, 256), (4096, 4096))
    assert _roofline.matmul_shapes("cross", 2048, 128) == ((256, 256), (2048, 2048))
    assert _roofline.matmul_shapes("cross_sym", 64, 8) == ((64, 64), (64, 64))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_measure_matmul_rates_tiny(dtype, monkeypatch):
    monkeypatch.setattr(_roofline, "SAMPLE_S", 1e-4)
    monkeypatch.setattr(_roofline, "BUDGET_S", 1e-3)
    r = _roofline.measure_matmul_rates("cross", 32, 8, dtype)
    assert r["ok"] and r["op"] == "torch.mm" and r["dtype"] == dtype
    for key in ("matmul_gflops", "matmul_tile_gflops"):
        assert math.isfinite(r[key]) and r[key] > 0
    assert r["matmul_shape"] == "32x8 @ 8x32" and r["matmul_samples"] >= 3
    assert "GFLOP/s" in _roofline.describe_rates(r)
    assert "not measured" in _roofline.describe_rates({"ok": False, "error": "x"})


RATES = {"ok": True, "matmul_gflops": 100.0, "matmul_tile_gflops": 80.0,
         "matmul_shape": "128x16 @ 16x128", "matmul_tile_shape": "128x16 @ 16x128"}


def test_bench_rows_carry_the_roofline():
    config = _bench.BenchConfig(loss="infonce", layout="cross", sizes=(64,), dim=16,
                                backends=("torch", "cpu"))
    ok = {"ok": True, "median_s": 0.002, "p20_s": 0.001, "p80_s": 0.003,
          "peak_extra_bytes": 10, "memory_method": "VmHWM"}
    rows = _bench.csv_rows(config, [_bench.Measurement("torch", 64, ok),
                                    _bench.Measurement("cpu", 64, {"ok": False, "error": "x"})],
                           RATES)
    r = rows[0]
    assert r["useful_gflop"] == 4 * 64 ** 2 * 16 * 2 / 1e9
    assert r["useful_gflops"] == pytest.approx(r["useful_gflop"] / 0.002)
    assert r["fraction_of_matmul"] == pytest.approx(r["useful_gflops"] / 100.0)
    assert r["fraction_of_matmul_tile"] == pytest.approx(r["useful_gflops"] / 80.0)
    assert r["matmul_gflops"] == 100.0 and r["matmul_shape"] == "128x16 @ 16x128"
    assert rows[1]["useful_gflops"] is None and rows[1]["fraction_of_matmul"] is None
    assert set(_bench.CSV_COLUMNS[-8:]) <= set(r)
    assert _bench.CSV_COLUMNS[:20][-1] == "error"  # the new columns come after the old ones
    assert "of matmul" in _bench.format_results(rows)
    # Without a matmul rate the fractions are empty, the useful work is not.
    bare = _bench.csv_rows(config, [_bench.Measurement("torch", 64, ok)])[0]
    assert bare["useful_gflops"] > 0 and bare["fraction_of_matmul"] is None


def test_profile_rows_carry_the_roofline_per_phase():
    config = _profile.ProfileConfig(loss="macl", layout="2n", sizes=(64,), dim=8,
                                    backends=("torch",))
    r = {"ok": True, "normalise_ms": 0.5, "forward_ms": 1.0, "backward_ms": 2.5, "step_ms": 4.0,
         "pairs_per_s": 1.0, "peak_bytes": 1, "forward_peak_extra_bytes": 0,
         "backward_peak_extra_bytes": 0, "memory_method": "VmHWM"}
    row = _profile.csv_rows(config, [("torch", 64, r)], RATES)[0]
    for phase, ms in (("forward", 1.0), ("backward", 2.5), ("step", 4.0)):
        gflops = _roofline.useful_flops("2n", 64, 8, phase) / 1e9 / (ms / 1e3)
        assert row[f"{phase}_useful_gflops"] == pytest.approx(gflops)
        assert row[f"{phase}_fraction_of_matmul"] == pytest.approx(gflops / 100.0)
    assert row["step_fraction_of_matmul_tile"] == pytest.approx(row["step_useful_gflops"] / 80.0)
    assert set(_profile.PROFILE_COLUMNS) >= set(row) - {"baseline_bytes"}
    assert "step/mm" in _profile.format_profile([row])
