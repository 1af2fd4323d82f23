"""Registers, stack (spill) and shared memory of the Triton kernels compiled for sm_90 without a
GPU, old and new ``triton_fused.py`` side by side: the tables of
bench/results/cpu_step_and_triton_resources_before_after/triton_sm90_resources.md (how to run it
and where the old module comes from: that file). A record of how those tables were made: it
imports ``macl_kernels.primitive.backends.triton_fused`` of the tree that made them (the Triton
backend is ``backends/triton/`` since); check out such a tree to rerun it.
"""
import os, sys, importlib.util, json
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from macl_kernels.primitive.backends import triton_fused as NEW
spec = importlib.util.spec_from_file_location("tf_old", "/tmp/oldtf/triton_fused_old.py")
OLD = importlib.util.module_from_spec(spec); spec.loader.exec_module(OLD)

def build(kernel, op, consts, warps, stages, new):
    acc = "fp64" if op == "fp64" else "fp32"
    sig = {}
    for name in kernel.arg_names:
        if name in consts: sig[name] = "constexpr"
        elif new:
            if name.endswith("_ptr"):
                sig[name] = "*i32" if name in ("pos_index_ptr", "self_index_ptr") else "*" + (op if name in ("anchors_ptr", "candidates_ptr") else acc)
            else: sig[name] = "fp32" if name.startswith("artanh") else "i32"
        else:
            if name in ("POS", "SELF"): sig[name] = "*i32"
            elif name in ("A", "C"): sig[name] = "*" + op
            elif name in ("B", "LSE", "E", "G", "DC", "DB"): sig[name] = "*" + acc
            else: sig[name] = "fp32" if name.startswith("artanh") else "i32"
    k = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    import subprocess, tempfile, re, triton.backends.nvidia as nv
    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out); stack = re.search(r"STACK:(\d+)", out); local = re.search(r"LOCAL:(\d+)", out)
    if regs is None: return dict(err=out[-300:])
    return dict(regs=int(regs.group(1)), stack=int(stack.group(1)), local=int(local.group(1)), shared=k.metadata.shared)

rows = []
for op, artanh, bd, (bm, bn, warps, stages), backward in [
        ("bf16", False, 128, (64, 64, 4, 2), (False, True)),
        ("bf16", True, 256, (64, 64, 8, 2), (False, True)),
        ("fp16", True, 128, (64, 64, 8, 2), (False,)),
        ("fp32", True, 512, (32, 32, 8, 1), (True,)),
        ("fp32", False, 128, (64, 64, 4, 2), (False, True)),
        ("fp64", False, 32, (32, 32, 4, 1), ())]:
    for new in (False, True):
        M = NEW if new else OLD
        common = dict(HAS_SELF=True, DOT_PRECISION="ieee", UPCAST=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        mapflag = dict(LOGIT_MAP=int(artanh)) if new else dict(ARTANH=artanh)
        wide = "WIDE_WEIGHTS" if new else "G_WIDE"
        f = build(M._forward_kernel, op, dict(ACC_E=True, **{wide: op == "fp16" and artanh}, **mapflag, **common), warps, stages, new)
        rows.append((op, artanh, bd, "fwd", "new" if new else "old", f))
        for sym in backward:
            db = "NEED_D_INV_TEMP" if new else "NEED_DB"
            b = build(M._candidates_kernel, op, dict(SYMMETRIC=sym, **{db: sym and not artanh}, **{wide: op == "fp16"}, **mapflag, **common), warps, stages, new)
            rows.append((op, artanh, bd, f"bwd sym={sym}", "new" if new else "old", b))
print("triton", triton.__version__)
for r in rows: print(*r)
