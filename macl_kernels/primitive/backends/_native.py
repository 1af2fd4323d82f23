"""Shared plumbing of the compiled backends (``cpu``: ``macl_kernels._C_cpu``; ``cuda``:
``macl_kernels._C_cuda``): import the extension once, remember why it failed."""

from __future__ import annotations

import importlib
from typing import Optional

import torch


class Extension:
    """A compiled extension module, imported on first use; ``get()`` is ``None`` when it cannot
    be imported (not built, or built against another torch) and ``error`` says why."""

    def __init__(self, name: str):
        self.name = name
        self._module = None
        self.error: Optional[str] = None

    def get(self):
        if self._module is None and self.error is None:
            try:
                self._module = importlib.import_module(self.name)
            except ImportError as exc:
                self.error = f"{type(exc).__name__}: {exc}"
        return self._module


def cast_rows(inv_temp: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """``inv_temp`` in the dtype the kernels compute in (the anchors'), contiguous."""
    return None if inv_temp is None else inv_temp.to(like.dtype).contiguous()
