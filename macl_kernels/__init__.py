"""macl-kernels: fused Model-Aware Contrastive Learning (MACL) and sibling contrastive losses.

    import macl_kernels as mk
    loss = mk.macl_loss(z1, z2)                 # functional, backend="auto"
    criterion = mk.MACLLoss()                   # drop-in for lightly's MACLLoss

``macl_kernels.reference`` is the full-matrix PyTorch oracle; ``available_backends()`` says which
fused backends can run here and why the others cannot.
"""

from ._version import __version__
from .primitive import available_backends
from ._math import MACL_TEMPERATURE_FLOOR
from .functional import (
    clip_loss,
    dcl_loss,
    infonce_loss,
    macl_loss,
    moco_loss,
    siglip_loss,
    tfree_loss,
)
from .modules import (ClipLoss, DCLLoss, DCLWLoss, MACLLoss, NTXentLoss, SigLipLoss,
                      SupConLoss)
from .supervised import supcon_loss, supcon_macl_loss
from .sogclr import GCLoss_v1
from .grad_cache import GradCache


__all__ = [
    "macl_loss", "infonce_loss", "clip_loss", "dcl_loss", "tfree_loss", "moco_loss", "siglip_loss",
    "available_backends",
    "MACLLoss", "NTXentLoss", "DCLLoss", "DCLWLoss", "ClipLoss", "SigLipLoss", "MACL_TEMPERATURE_FLOOR",
    "GradCache",
    "supcon_loss", "supcon_macl_loss", "SupConLoss", "GCLoss_v1",
    "__version__",
]
