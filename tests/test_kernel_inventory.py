"""The Triton backend's GPU shape rules and the kernel inventory (``macl-kernels kernels``).

Pure Python, everywhere: the shape tables are well formed, each precision supports the widths
the README promises, widths without a shape are refused on a GPU (``ValueError``) and passed
over by ``auto``, an ``OutOfResources`` at launch becomes an error naming the shape and dtype.
Slow (a subprocess without ``TRITON_INTERPRET`` compiling for sm_90 with Triton's bundled ptxas,
no GPU): the default configuration at each precision's widest width compiles with at most 1 KB
of spill, within the H100's shared memory and the table's recorded figure, with 64-bit row
offsets; a kernel with 32-bit row offsets is caught by the same check; the CLI runs.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: no Triton kernels to inventory")

from macl_kernels.primitive import backends as B  # noqa: E402
from macl_kernels.primitive import Options  # noqa: E402
from macl_kernels.tools import cli  # noqa: E402
from macl_kernels.tools import inventory as I  # noqa: E402
from macl_kernels.primitive.backends import triton as TF  # noqa: E402
# The layers whose switches and launcher the tests set or call.
from macl_kernels.primitive.backends.triton import config as TC  # noqa: E402
from macl_kernels.primitive.backends.triton import launch as TL  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")

# The widest BLOCK_D each precision class serves on an H100/H200 (README, GPU section).
WIDEST = {"fp32": 128, "fp32-tf32": 1024, "bf16": 1024, "fp16": 1024, "fp64": 512}


def test_shape_tables_are_well_formed():
    for (precision, kind), widths in TF.SHAPES.items():
        assert precision in TF.PRECISIONS and kind in ("forward", "candidates")
        largest = [w for w, _ in widths]
        assert largest == sorted(set(largest)), (precision, kind)
        for width, entries in widths:
            assert entries, (precision, kind, width)
            for (bm, bn, warps, stages), shared in entries:
                assert bm in (16, 32, 64, 128) and bn in (16, 32, 64, 128)
                assert warps in (4, 8) and stages in (1, 2, 3)
                assert 0 < shared <= TF.H100_SHARED_MEMORY, (precision, kind, width, bm, bn)


@pytest.mark.parametrize("precision", list(TF.PRECISIONS))
def test_each_precision_serves_its_widths(precision):
    assert TF.max_block_d(precision) == WIDEST[precision]
    for block_d in (16, 32, 64, 128, 256, 512, 1024):
        for kind in ("forward", "candidates"):
            shapes = TF.shape_candidates(kind, precision, block_d)
            assert bool(shapes) == (block_d <= WIDEST[precision])
    # A smaller GPU (A100: 163 KB, consumer parts: 99 KB) keeps the shapes that fit it.
    assert TF.max_block_d(precision, TF.SHARED_MEMORY_LIMIT[80]) >= 128
    assert TF.max_block_d(precision, TF.SHARED_MEMORY_LIMIT[89]) >= 64


@pytest.fixture
def compiled_mode(monkeypatch):
    """The backend as on a GPU (the refusals are GPU-only: the interpreter has no limits)."""
    monkeypatch.setattr(TC, "INTERPRET", False)


def test_widths_without_a_shape_are_refused_on_a_gpu(compiled_mode):
    reason = TF.TritonBackend._shape_refusal(768, torch.float32, CUDA)
    assert "fp32" in reason and "D = 768" in reason and "'high'" in reason
    assert TF.TritonBackend._shape_refusal(768, torch.bfloat16, CUDA) is None
    assert TF.TritonBackend._shape_refusal(1024, torch.float64, CUDA) is not None
    assert TF.TritonBackend._shape_refusal(128, torch.float32, CUDA) is None
    assert TF.TritonBackend._shape_refusal(256, torch.float32, CUDA) is not None


def test_auto_passes_over_triton_per_dtype(compiled_mode):
    assert B.not_supported_reasons("triton", CUDA, torch.float32, 768)
    assert not B.not_supported_reasons("triton", CUDA, torch.bfloat16, 768)
    assert not B.not_supported_reasons("triton", CUDA, torch.float64, 128)
    assert B.not_supported_reasons("triton", CUDA, torch.bfloat16, 2048)  # MAX_D
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # tf32: served up to 1024
    try:
        assert not B.not_supported_reasons("triton", CUDA, torch.float32, 768)
    finally:
        torch.set_float32_matmul_precision(previous)
    # The interpreter (CPU) accepts every width up to MAX_D.
    assert TF.TritonBackend._shape_refusal(768, torch.float32, torch.device("cpu")) is None


def _target(arch):
    return Options(shared_limit=TF.SHARED_MEMORY_LIMIT[I.ARCHS[arch]])


def test_inventory_refuses_what_the_backend_refuses():
    """The inventory's ``refused`` is the backend's ``not_supported_reasons`` for the target (no
    GPU, whatever this process's Triton mode): float32 (3xTF32) at BLOCK_D 256 is refused on
    sm_90 with the backend's reason, at 128 every kernel is compiled."""
    rows = I.plan("sm_90", ["fp32"], [128, 256], candidates=False, flag_sets="heaviest")
    reasons = B.not_supported_reasons("triton", CUDA, torch.float32, 256, _target("sm_90"))
    assert [r.kind for r in reasons] == ["width"] and "fp32 operands at D = 256" in reasons[0]
    assert not B.not_supported_reasons("triton", CUDA, torch.float32, 128, _target("sm_90"))
    assert {(r["kernel"], r["block_d"], r["role"]) for r in rows} == \
        {(k, 128, "default") for k in TF.KERNELS} | {(k, 256, "refused") for k in TF.KERNELS}
    for row in rows:
        if row["role"] == "refused":
            assert row["ok"] and row["problem"] == "backend refuses: " + "; ".join(reasons)
    # The target's shared memory, width by width: float32 tf32 loses BLOCK_D 512's only shape
    # on an A100 (sm_80) and keeps 1024's; bfloat16 operands (float32 compute) keep both.
    with I.float32_matmul_precision("high"):
        assert B.not_supported_reasons("triton", CUDA, torch.float32, 512, _target("sm_80"))
        assert not B.not_supported_reasons("triton", CUDA, torch.float32, 1024, _target("sm_80"))
    assert not B.not_supported_reasons("triton", CUDA, torch.bfloat16, 512, _target("sm_80"))
    rows = I.plan("sm_80", ["fp32-tf32", "bf16"], [512, 1024], kernels=["forward"],
                  candidates=False, flag_sets="heaviest")
    assert [(r["precision"], r["block_d"], r["role"]) for r in rows] == [
        ("fp32-tf32", 512, "refused"), ("fp32-tf32", 1024, "default"),
        ("bf16", 512, "default"), ("bf16", 1024, "default")]
    assert torch.get_float32_matmul_precision() == "highest"  # plan restored it


def test_inventory_takes_the_backends_answer(compiled_mode, monkeypatch):
    """No second copy of the rule: the backend's refusal (here of every width) is what the
    inventory lists, and a width the backend serves without a shape of the table is a failure.
    Asked about this machine's GPU (no ``shared_limit``), the backend answers as for auto."""
    local = B.not_supported_reasons("triton", CUDA, torch.float32, 256)
    assert local == B.not_supported_reasons("triton", CUDA, torch.float32, 256, _target("sm_90"))
    monkeypatch.setattr(TF.TritonBackend, "_shape_refusal",
                        staticmethod(lambda d, op, device, limit=None: f"refused at {limit}"))
    rows = I.plan("sm_90", ["bf16"], [64], kernels=["forward"], candidates=False)
    assert [(r["role"], r["ok"], r["problem"]) for r in rows] == \
        [("refused", True, f"backend refuses: refused at {TF.H100_SHARED_MEMORY}")]
    monkeypatch.setattr(TF.TritonBackend, "_shape_refusal", staticmethod(lambda *a: None))
    rows = I.plan("sm_90", ["fp32"], [256], kernels=["forward"], candidates=False)
    assert [(r["role"], r["ok"]) for r in rows] == [("refused", False)]
    assert "NoFittingShape" in rows[0]["problem"]
    assert I.summary(rows)[0]["failures"] == 1


class _RaisingKernel:
    """Stands for a compiled kernel that does not fit the GPU at launch."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.errors import OutOfResources

            raise OutOfResources(300_000, 232_448, "shared memory")
        return launch


def test_out_of_resources_at_launch_names_the_shape_and_dtype(compiled_mode, monkeypatch):
    monkeypatch.setattr(TC, "AUTOTUNE", False)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a test GPU")
    spec = TF.KERNELS["forward"]._replace(function=_RaisingKernel())
    monkeypatch.setitem(TF.KERNELS, "forward", spec)
    anchors = torch.zeros(10, 200)
    with pytest.raises(TF.TritonResourceError, match=r"bf16 operands at D = 200"):
        TL.launch("forward", 10, (anchors,), "bf16", BLOCK_D=256)
    # Without autotuning the next shape of the list is tried before giving up.
    tried = []

    class FirstDoesNotFit:
        def __getitem__(self, grid):
            def launch(*args, num_warps, num_stages, **kwargs):
                from triton.runtime.errors import OutOfResources

                tried.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"], num_warps, num_stages))
                if len(tried) == 1:
                    raise OutOfResources(300_000, 232_448, "shared memory")
            return launch

    monkeypatch.setitem(TF.KERNELS, "forward", spec._replace(function=FirstDoesNotFit()))
    TL.launch("forward", 10, (anchors,), "bf16", BLOCK_D=256)
    assert tried == TF.shape_candidates("forward", "bf16", 256)[:2]
    with pytest.raises(TF.NoFittingShape, match=r"fp32 operands at D = 200"):
        TL.launch("forward", 10, (anchors,), "fp32", BLOCK_D=512)


def test_kernel_table_lists_every_kernel():
    assert set(TF.KERNELS) >= {"forward", "candidates", "both_forward", "both_backward",
                               "softplus_forward", "softplus_candidates"}
    for name, spec in TF.KERNELS.items():
        assert spec.kind in ("forward", "candidates")
        args = set(spec.function.arg_names)
        # Every pointer argument is typed by the inventory's signature builder: the index and
        # label pointers are the kernel's own, the float scalars arrive as logit_params_ptr.
        assert set(spec.index_args) | set(spec.label_args) <= args, name
        assert not {"artanh_scale", "artanh_eps"} & args, name
        assert set(spec.tune_key) <= args, name
        for precision in TF.PRECISIONS:
            sets = spec.inventory_flags(precision)
            assert sets and all(set(flags) <= args for _, flags in sets)
    # The label mask and the SigLIP bias are tuned and inventoried as flags of their own.
    assert "HAS_LABELS" in TF.KERNELS["forward"].tune_key
    assert "HAS_LABELS" in TF.KERNELS["candidates"].tune_key
    assert "HAS_BIAS" in TF.KERNELS["softplus_forward"].tune_key
    assert any(flags.get("HAS_LABELS") for _, flags in
               TF.KERNELS["forward"].inventory_flags("bf16"))
    assert not TF.KERNELS["both_forward"].autotuned


def test_label_pointers_are_int64_in_the_inventory_signature():
    from macl_kernels.tools import inventory as I

    spec = TF.KERNELS["forward"]
    signature, _ = I._signature(spec, "bf16", {"BLOCK_D": 64})
    assert signature["anchor_labels_ptr"] == signature["candidate_labels_ptr"] == "*i64"
    assert signature["pos_index_ptr"] == "*i32" and signature["anchors_ptr"] == "*bf16"
    assert signature["logit_params_ptr"] == "*fp32"
    signature, _ = I._signature(TF.KERNELS["both_forward"], "fp64", {})
    assert signature["mirrored_pos_index_ptr"] == "*i32"
    assert signature["logit_params_ptr"] == "*fp64"


# --------------------------------------------------------------------------------------------
# Compiled for sm_90 without a GPU
# --------------------------------------------------------------------------------------------

INVENTORY_SCRIPT = r'''
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from macl_kernels.tools import inventory as I
from macl_kernels.primitive.backends import triton as TF

rows = []
for precision in TF.PRECISIONS:
    # float32 (3xTF32) every flag set: at BLOCK_D 256 the SCALED ones spilled 5-7 KB where the
    # heaviest did not, which is why float32 stops at 128.
    rows += I.plan("sm_90", [precision], [TF.max_block_d(precision)], candidates=False,
                   flag_sets="all" if precision == "fp32" else "heaviest")
rows = I.run(rows)


@triton.jit
def _rows_i32(x_ptr, stride, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ptrs = x_ptr + offs[:, None] * stride + offs[None, :]
    tl.store(ptrs, tl.load(ptrs) + 1)


@triton.jit
def _rows_i64(x_ptr, stride, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ptrs = x_ptr + offs.to(tl.int64)[:, None] * stride + offs[None, :]
    tl.store(ptrs, tl.load(ptrs) + 1)


control = {}
for fn in (_rows_i32, _rows_i64):
    k = triton.compile(ASTSource(fn, {"x_ptr": "*fp32", "stride": "i32", "BLOCK": "constexpr"},
                                 {"BLOCK": 16}), target=GPUTarget("cuda", 90, 32))
    control[fn.__name__] = bool(I._I32_TENSOR_PRODUCT.search(k.asm["ttir"]))
print("RESULT" + json.dumps({"rows": rows, "control": control}))
'''


def _compile_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the GPU tests run the kernels")
def test_chosen_configurations_compile_within_the_rules(tmp_path):
    """Per precision class, the default shape at its widest width, the heaviest flag set of
    each kernel (every flag set for float32): spill <= 1 KB, shared memory within the H100's
    and the table's figure, 64-bit row offsets. The full table (every width, flag set and autotune candidate,
    Triton 3.9 and 3.6) is committed under bench/results/gpu_sm90_compiled_resources/."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend to compile with")
    script = tmp_path / "inventory_check.py"
    script.write_text(INVENTORY_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=_compile_env(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    # The check catches 32-bit row offsets (negative control) and passes 64-bit ones.
    assert result["control"] == {"_rows_i32": True, "_rows_i64": False}
    rows = result["rows"]
    assert len(rows) == len(TF.KERNELS) * (len(TF.PRECISIONS) - 1) + sum(
        len(spec.inventory_flags("fp32")) for spec in TF.KERNELS.values())
    for row in rows:
        where = f"{row['kernel']} {row['precision']} BLOCK_D={row['block_d']}"
        assert row["ok"], f"{where}: {row['problem']}"
        assert row["spill_bytes"] <= 1024 and row["int64_offsets"], where
        assert row["shared_bytes"] <= min(row["shared_recorded"], TF.H100_SHARED_MEMORY), where


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the GPU tests run the kernels")
def test_kernels_command_writes_its_table(tmp_path, monkeypatch):
    """``macl-kernels kernels`` under TRITON_INTERPRET (as here) re-runs itself without it."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend to compile with")
    for key, value in _compile_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "inventory.csv"
    status = cli.main(["kernels", "--precisions", "bf16", "--widths", "16", "--kernels",
                       "forward", "--no-candidates", "--flag-sets", "heaviest", "--quiet",
                       "--csv", str(out)])
    assert status == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [(r["kernel"], r["precision"], r["block_d"], r["role"], r["ok"]) for r in rows] == \
        [("forward", "bf16", "16", "default", "True")]
