"""The Triton backend's launch layer: the one table of its kernels (``KERNELS``: a kernel is
launched, autotuned and inventoried once it is registered there with ``register_kernel``), the
autotuner built from the shape tables of ``config.py``, and the launcher (``launch``) that runs
a kernel under the interpreter, through the autotuner, or with the table's default shape.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...protocol import LogitMap
from . import config, kernels
from .config import SHAPES, device_shared_limit, max_block_d, precision_of, shape_candidates

try:
    import triton
except ImportError:  # pragma: no cover - config.IMPORT_ERROR says why
    triton = None


class KernelSpec(NamedTuple):
    """One Triton kernel as the launcher, the shape rules and the inventory see it. Register a
    new kernel in ``KERNELS`` (``register_kernel``) so that ``macl-kernels kernels`` compiles and
    checks it with the others."""

    function: object  # the @triton.jit function
    kind: str  # "forward" (BLOCK_M rows resident) or "candidates" (BLOCK_N rows resident)
    tune_key: tuple  # the autotuner's key (besides BLOCK_D)
    # precision name -> the constexpr flag sets the inventory compiles: ((label, flags), ...)
    inventory_flags: object
    operand_args: tuple = ("anchors_ptr", "candidates_ptr")  # pointers of the operand dtype
    index_args: tuple = ("pos_index_ptr", "self_index_ptr")  # int32 pointers
    label_args: tuple = ()  # int64 pointers (labels are arbitrary integers, never narrowed)
    # False: launched with one fixed shape of the table, chosen before the launch (a buffer is
    # sized by it), never through the autotuner.
    autotuned: bool = True

    @property
    def grid_block(self) -> str:
        return "BLOCK_M" if self.kind == "forward" else "BLOCK_N"


def _scaled_or_artanh(artanh: bool) -> int:
    return int(LogitMap.ARTANH if artanh else LogitMap.SCALED)


def _forward_flag_sets(precision: str):
    """Every flag combination the forward is launched with (HAS_SELF on: the larger kernel).
    The label mask comes with the SCALED map (the losses that take labels scale by a
    temperature) and adds two loads and a compare per tile."""
    return tuple((f"{'artanh' if artanh else 'scaled'}{' +E' if acc_e else ''}"
                  f"{' labels' if labels else ''}",
                  dict(LOGIT_MAP=_scaled_or_artanh(artanh), ACC_E=acc_e, HAS_LABELS=labels,
                       WIDE_WEIGHTS=precision == "fp16" and artanh))
                 for artanh in (False, True) for acc_e in (True, False)
                 for labels in ((False, True) if not artanh else (False,)))


def _candidates_flag_sets(precision: str):
    return tuple((f"{'artanh' if artanh else 'scaled'} {'sym' if sym else 'cross'}"
                  f"{' labels' if labels else ''}",
                  dict(LOGIT_MAP=_scaled_or_artanh(artanh), MIRRORED=sym,
                       NEED_D_INV_TEMP=sym and not artanh, HAS_LABELS=labels,
                       WIDE_WEIGHTS=precision == "fp16"))
                 for artanh in (False, True) for sym in (False, True)
                 for labels in ((False, True) if not artanh else (False,)))


def _both_forward_flag_sets(precision: str):
    return tuple(("artanh" if artanh else "scaled", dict(LOGIT_MAP=_scaled_or_artanh(artanh)))
                 for artanh in (False, True))


def _both_backward_flag_sets(precision: str):
    """The candidates kernel as both directions launch it: mirrored, no labels."""
    return tuple(("artanh" if artanh else "scaled",
                  dict(LOGIT_MAP=_scaled_or_artanh(artanh), MIRRORED=True, HAS_LABELS=False,
                       NEED_D_INV_TEMP=not artanh, WIDE_WEIGHTS=precision == "fp16"))
                 for artanh in (False, True))


def _softplus_forward_flag_sets(precision: str):
    return tuple((f"{'bias' if bias else 'no bias'}{' +E' if acc_e else ''}",
                  dict(HAS_BIAS=bias, ACC_E=acc_e))
                 for bias in (True, False) for acc_e in (True, False))


def _softplus_candidates_flag_sets(precision: str):
    return tuple(("bias" if bias else "no bias",
                  dict(HAS_BIAS=bias, WIDE_WEIGHTS=precision == "fp16"))
                 for bias in (True, False))


KERNELS: dict = {}
_TUNED: dict = {}


def register_kernel(name: str, spec: KernelSpec) -> None:
    """Add a kernel to the table the launcher (``launch``) and the inventory read."""
    KERNELS[name] = spec
    _TUNED.pop(name, None)


if triton is not None:
    _LABELS = ("anchor_labels_ptr", "candidate_labels_ptr")
    _INDEX = ("pos_index_ptr", "self_index_ptr")
    _MIRRORED_INDEX = ("mirrored_pos_index_ptr", "mirrored_self_index_ptr")
    register_kernel("forward", KernelSpec(
        kernels.forward_kernel, "forward",
        ("LOGIT_MAP", "HAS_SELF", "ACC_E", "HAS_LABELS", "DOT_PRECISION", "WIDE_WEIGHTS"),
        _forward_flag_sets, label_args=_LABELS))
    register_kernel("candidates", KernelSpec(
        kernels.candidates_kernel, "candidates",
        ("LOGIT_MAP", "HAS_SELF", "MIRRORED", "NEED_D_INV_TEMP", "HAS_LABELS", "DOT_PRECISION",
         "WIDE_WEIGHTS"), _candidates_flag_sets,
        index_args=_INDEX + _MIRRORED_INDEX, label_args=_LABELS))
    # Both directions (layout cross_sym): the forward's columns' partials have one row per
    # program, so its BLOCK_M is fixed before the launch: the table's default shape, no tuning.
    register_kernel("both_forward", KernelSpec(
        kernels.both_forward_kernel, "forward", ("LOGIT_MAP", "HAS_SELF", "DOT_PRECISION"),
        _both_forward_flag_sets,
        index_args=_INDEX + _MIRRORED_INDEX, autotuned=False))
    # Its backward is the candidates kernel, mirrored (one family with layout 2n's backward),
    # launched once per side: an entry of its own for the flag sets, tuning and inventory of
    # that use.
    register_kernel("both_backward", KernelSpec(
        kernels.candidates_kernel, "candidates",
        ("LOGIT_MAP", "HAS_SELF", "NEED_D_INV_TEMP", "DOT_PRECISION", "WIDE_WEIGHTS"),
        _both_backward_flag_sets, index_args=_INDEX + _MIRRORED_INDEX, label_args=_LABELS))
    # RowReduction.SOFTPLUS (SigLIP).
    register_kernel("softplus_forward", KernelSpec(
        kernels.softplus_forward_kernel, "forward",
        ("HAS_BIAS", "HAS_SELF", "ACC_E", "DOT_PRECISION"), _softplus_forward_flag_sets))
    register_kernel("softplus_candidates", KernelSpec(
        kernels.softplus_candidates_kernel, "candidates",
        ("HAS_BIAS", "HAS_SELF", "DOT_PRECISION", "WIDE_WEIGHTS"),
        _softplus_candidates_flag_sets))


def _autotune_config(shape):
    bm, bn, warps, stages = shape
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def tuned_kernel(name: str):
    """The autotuned wrapper of kernel ``name``: its space is every shape of its kind, pruned per
    call to the measured list for the call's precision and width (``shape_candidates``). Each
    kernel writes its outputs without reading them, so benchmarking configs on the real buffers
    is harmless (no reset_to_zero needed)."""
    if name not in _TUNED:
        spec = KERNELS[name]
        space = sorted({shape for (_, kind), widths in SHAPES.items() if kind == spec.kind
                        for _, entries in widths for shape, _ in entries})

        def prune(configs, named_args, **kwargs):
            args = {**named_args, **kwargs}
            operands = args[spec.operand_args[0]]
            precision = precision_of(operands.dtype, args["DOT_PRECISION"])
            keep = set(shape_candidates(spec.kind, precision, args["BLOCK_D"],
                                        device_shared_limit(operands.device)))
            return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                           c.num_warps, c.num_stages) in keep]

        _TUNED[name] = triton.autotune(
            configs=[_autotune_config(s) for s in space],
            prune_configs_by={"early_config_prune": prune},
            key=["BLOCK_D", *spec.tune_key])(spec.function)
    return _TUNED[name]


class NoFittingShape(ValueError):
    """No measured tile shape fits this precision and width (or this GPU's shared memory)."""


class TritonResourceError(RuntimeError):
    """A compiled kernel did not fit the GPU at launch (Triton's ``OutOfResources``)."""


def refusal(precision: str, d: int, shared_limit: int) -> str:
    """Why width ``d`` is refused for ``precision`` operands within ``shared_limit`` bytes of
    shared memory, and what to use instead."""
    widest = max_block_d(precision, shared_limit)
    hint = {"fp32": "; float32 at torch.set_float32_matmul_precision('high') (tf32) runs up to "
                    f"D = {max_block_d('fp32-tf32', shared_limit)}",
            "fp64": "; float64 is for checking, not training",
            }.get(precision, "")
    return (f"the triton backend has no tile shape for {precision} operands at D = {d} that "
            f"compiles without register spills within {shared_limit} B of shared memory (it "
            f"supports D <= {widest} there{hint}); use backend='cuda' or 'torch', or 'auto'")


def launch_shape(name: str, precision: str, block_d: int, device: torch.device):
    """The shape kernel ``name`` runs with when it is not autotuned (``config.AUTOTUNE`` off, or
    a kernel registered with ``autotuned=False``): the interpreter's blocks, else the table's
    default for the precision, width and device (``NoFittingShape`` when there is none)."""
    if config.INTERPRET:
        return (config.INTERPRETER_BLOCK_M, config.INTERPRETER_BLOCK_N, 4, 1)
    limit = device_shared_limit(device)
    shapes = shape_candidates(KERNELS[name].kind, precision, block_d, limit)
    if not shapes:
        raise NoFittingShape(refusal(precision, block_d, limit))
    return shapes[0]


def launch(name: str, grid_rows: int, args, precision: str, shape=None, **flags):
    """Launch kernel ``name`` of ``KERNELS`` over ``grid_rows`` rows: under the interpreter with
    the fixed small blocks; on a GPU (on the tensors' device: Triton launches on the current one)
    through the autotuner, or with the default shape when ``config.AUTOTUNE`` is off.
    ``shape``: exactly this shape (a kernel whose buffers were sized by it, ``launch_shape``), no
    fallback."""
    spec = KERNELS[name]
    if config.INTERPRET:
        blocks = dict(BLOCK_M=config.INTERPRETER_BLOCK_M, BLOCK_N=config.INTERPRETER_BLOCK_N)
        if shape is not None:
            blocks = dict(BLOCK_M=shape[0], BLOCK_N=shape[1])
        spec.function[(triton.cdiv(grid_rows, blocks[spec.grid_block]),)](
            *args, **flags, **blocks)
        return
    device = args[0].device
    limit = device_shared_limit(device)
    shapes = shape_candidates(spec.kind, precision, flags["BLOCK_D"], limit)
    if not shapes:
        raise NoFittingShape(refusal(precision, args[0].shape[-1], limit))
    if shape is not None:
        shapes = [tuple(shape)]
    try:
        with torch.cuda.device(device):
            # The autotuner drops candidates that raise OutOfResources itself.
            if config.AUTOTUNE and spec.autotuned and shape is None:
                grid = lambda meta: (triton.cdiv(grid_rows, meta[spec.grid_block]),)  # noqa: E731
                tuned_kernel(name)[grid](*args, **flags)
            else:
                # The default shape, else the next one of the list: the recorded shared memory
                # is sm_90's, another architecture may need more (nothing is written before a
                # kernel that does not fit raises).
                for i, (bm, bn, warps, stages) in enumerate(shapes):
                    blocks = dict(BLOCK_M=bm, BLOCK_N=bn)
                    try:
                        spec.function[(triton.cdiv(grid_rows, blocks[spec.grid_block]),)](
                            *args, **flags, **blocks, num_warps=warps, num_stages=stages)
                        break
                    except _OUT_OF_RESOURCES:
                        if i == len(shapes) - 1:
                            raise
    except _OUT_OF_RESOURCES as exc:
        raise TritonResourceError(
            f"the triton {name} kernel ran out of GPU resources for {precision} operands at "
            f"D = {args[0].shape[-1]} (BLOCK_D = {flags['BLOCK_D']}, shapes tried: {shapes}, "
            f"{limit} B of shared memory on {torch.cuda.get_device_name(device)}): {exc}. "
            f"Please report it with `macl-kernels info`; use backend='cuda' or 'torch' "
            f"meanwhile") from exc


def _out_of_resources():
    try:
        from triton.runtime.errors import OutOfResources
        return OutOfResources
    except ImportError:  # pragma: no cover - every Triton 3.x has it
        return RuntimeError


_OUT_OF_RESOURCES = _out_of_resources() if triton is not None else RuntimeError


