"""The public signatures, pinned (issue #24: no new public argument, one function per loss).

Every callable of ``macl_kernels.__all__`` (for a class, its ``__init__``) against a literal table
written from the signatures before the library's reorganisation (the ``API`` listings of
README.md). A new or renamed argument, a changed default, a keyword-only marker moved: the test
names the entry and shows both signatures. Changing one on purpose means changing this table,
README.md and CHANGELOG.md together.
"""

from __future__ import annotations

import inspect

import pytest

import macl_kernels as mk

SIGNATURES = {
    'macl_loss': (
        "(z1, z2, *, temperature=0.1, alpha=0.5, a0=0.0, schedule='linear', "
        "temperature_mode='batch', reweight=True, layout='2n', normalize=True, reduction='mean', "
        "gather_distributed=False, backend='auto', validate=True, negatives=None, labels=None)"),
    'infonce_loss': (
        "(z1, z2, *, temperature=0.1, layout='2n', normalize=True, reduction='mean', "
        "gather_distributed=False, backend='auto', validate=True, negatives=None, labels=None)"),
    'clip_loss': (
        "(image_features, text_features, logit_scale, *, normalize=True, reduction='mean', "
        "gather_distributed=False, backend='auto', validate=True, negatives=None)"),
    'dcl_loss': (
        "(z1, z2, *, temperature=0.1, weighted=False, sigma=0.5, layout='2n', normalize=True, "
        "reduction='mean', gather_distributed=False, backend='auto', validate=True, "
        "weights: 'Optional[torch.Tensor]' = None, negatives=None, labels=None)"),
    'tfree_loss': (
        "(z1, z2, *, scale=2.0, eps=1e-06, layout='2n', normalize=True, reduction='mean', "
        "gather_distributed=False, backend='auto', validate=True, negatives=None)"),
    'moco_loss': (
        "(query, key, bank, *, temperature=0.1, loss='infonce', alpha=0.5, a0=0.0, "
        "schedule='linear', temperature_mode='batch', in_batch_negatives=False, normalize=True, "
        "reduction='mean', gather_distributed=False, backend='auto', validate=True)"),
    'siglip_loss': (
        '(image_features, text_features, logit_scale, logit_bias=None, *, normalize=True, '
        "reduction='mean', gather_distributed=False, backend='auto', validate=True)"),
    'available_backends': "(device=None) -> 'Dict[str, Optional[str]]'",
    'MACLLoss': (
        "(self, temperature: 'float' = 0.1, alpha: 'float' = 0.5, A_0: 'float' = 0.0, *, "
        "gather_distributed: 'bool' = False, backend: 'str' = 'auto')"),
    'NTXentLoss': (
        "(self, temperature: 'float' = 0.5, memory_bank_size: 'Union[int, Sequence[int]]' = 0, "
        "gather_distributed: 'bool' = False, *, backend: 'str' = 'auto', "
        "persistent_bank: 'bool' = False)"),
    'DCLLoss': (
        "(self, temperature: 'float' = 0.1, weight_fn: 'Optional[Callable[[Tensor, Tensor], "
        "Tensor]]' = None, gather_distributed: 'bool' = False, *, backend: 'str' = 'auto')"),
    'DCLWLoss': (
        "(self, temperature: 'float' = 0.1, sigma: 'float' = 0.5, "
        "gather_distributed: 'bool' = False, *, backend: 'str' = 'auto')"),
    'ClipLoss': (
        "(self, local_loss: 'bool' = False, gather_with_grad: 'bool' = False, "
        "cache_labels: 'bool' = False, rank: 'int' = 0, world_size: 'int' = 1, "
        "use_horovod: 'bool' = False, *, backend: 'str' = 'auto')"),
    'SigLipLoss': (
        "(self, cache_labels: 'bool' = False, rank: 'int' = 0, world_size: 'int' = 1, "
        "dist_impl: 'Optional[str]' = None, chunk_size: 'int' = 0, *, backend: 'str' = 'auto')"),
    'GradCache': (
        "(self, loss_fn: 'Callable[..., Tensor]', encoder: 'Callable', "
        "encoder2: 'Optional[Callable]' = None, *, chunk_size: 'int', "
        "get_rep: 'Optional[Callable[[Any], Tensor]]' = None, "
        "allow_batch_statistics: 'bool' = False, loss_parameters: 'Iterable[Tensor]' = (), "
        "generators: 'Iterable[torch.Generator]' = (), check_replay: 'bool' = False, "
        "process_group: 'Optional[Any]' = None)"),
    'supcon_loss': (
        '(features, labels=None, *, mask=None, temperature=0.07, base_temperature=0.07, '
        "contrast_mode='all', normalize=False, reduction='mean', gather_distributed=False, "
        "backend='auto', validate=True)"),
    'supcon_macl_loss': (
        "(features, labels, *, temperature=0.1, alpha=0.5, a0=0.0, schedule='linear', "
        "alignment='label', normalize=True, reduction='mean', backend='auto', validate=True)"),
    'SupConLoss': (
        "(self, temperature: 'float' = 0.1, *, backend: 'str' = 'auto', validate=True, **kwargs)"),
    'GCLoss_v1': (
        '(self, N=100000, tau=0.1, gamma=0.9, eps=1e-08, device=None, distributed=False, '
        'enable_isogclr=False, tau_min=0.05, tau_max=0.7, rho=0.3, eta=0.01, beta=0.9, '
        "gamma_schedule='constant', gamma_decay_epochs=-1, *, state_dtype=None, "
        "update_state=True, backend='auto', validate=True)"),
}

# The non-callable public names (values, not signatures).
CONSTANTS = {"MACL_TEMPERATURE_FLOOR", "__version__"}


def _signature(obj) -> str:
    return str(inspect.signature(obj.__init__ if inspect.isclass(obj) else obj))


def test_the_table_covers_all_of_the_public_names():
    assert set(SIGNATURES) | CONSTANTS == set(mk.__all__)
    assert not set(SIGNATURES) & CONSTANTS


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_public_signature_is_unchanged(name):
    assert _signature(getattr(mk, name)) == SIGNATURES[name], name


def test_a_changed_signature_is_seen():
    """The comparison sees a keyword added (what a drop-in's private option would look like)."""

    def changed(z1, z2, *, temperature=0.1, layout="2n", normalize=True, reduction="mean",
                gather_distributed=False, backend="auto", validate=True, negatives=None,
                labels=None, lenient=False):
        pass

    assert _signature(changed) != SIGNATURES["infonce_loss"]
    assert _signature(changed).replace(", lenient=False", "") == SIGNATURES["infonce_loss"]


def test_one_function_per_loss():
    """No public loss forwards to a private twin: the functional losses are the bodies (the
    autocast guard's wrapper aside), with no private function of the same loss beside them."""
    from macl_kernels import functional, supervised

    for module in (functional, supervised):
        public = {n for n in module.__all__ if n.endswith("_loss")}
        for name in public:
            twin = "_" + name[:-len("_loss")]
            assert not hasattr(module, twin), f"{module.__name__}.{twin} beside {name}"
