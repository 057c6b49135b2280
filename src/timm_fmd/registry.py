"""``fmd_<arch>`` twins of every timm architecture, in timm's own registry.

After ``import timm_fmd``::

    model = timm.create_model('fmd_resnet50.a1_in1k', pretrained=True, num_classes=10,
                              fmd_prob=0.07, fmd_block_size=7, fmd_stages=(-2, -1))

The twin's entrypoint takes the ``fmd_*`` keyword arguments (see :class:`timm_fmd.inject.FMDSettings`),
passes every other argument -- ``pretrained``, the pretrained tag, ``num_classes``, ``drop_rate``,
``in_chans``, ... -- to the base architecture's own entrypoint, so pretrained weights load through
timm's normal path, and then injects FMD. Its pretrained tags are the base's tags: each twin is
registered with *resolved* copies of the base's pretrained cfgs (``get_arch_pretrained_cfgs``), whose
``hf_hub_id`` already names the base's repository (a raw ``'timm/'`` id would be completed to
``timm/fmd_<arch>.<tag>``, which does not exist).

Registration is one closure and one ``register_model`` call per architecture, timed by
``benchmarks/bench_registry.py``. Architectures registered after ``import timm_fmd`` get their twin
from :func:`register_fmd_models`, or use :func:`timm_fmd.create_model` / :func:`timm_fmd.apply_fmd`.
"""
from __future__ import annotations

import warnings
from collections import deque
from typing import Any, Callable, Dict, Iterable, Optional

import timm
from timm.models import get_arch_pretrained_cfgs, model_entrypoint, register_model
from timm.models._registry import DefaultCfg, _model_entrypoints, split_model_name_tag

from .inject import FMDSettings, apply_fmd

__all__ = ['PREFIX', 'register_fmd_models', 'base_architecture']

PREFIX = 'fmd_'
# ``register_model`` looks up each entrypoint's pretrained cfgs in its module's ``default_cfgs``.
default_cfgs: Dict[str, DefaultCfg] = {}


def base_architecture(model_name: str) -> str:
    """``'fmd_resnet50.a1_in1k'`` -> ``'resnet50'``: the architecture without prefix and tag."""
    arch, _ = split_model_name_tag(model_name)
    return arch[len(PREFIX):] if arch.startswith(PREFIX) else arch


def _entrypoint(arch: str) -> Callable[..., Any]:
    def fmd_model(pretrained: bool = False, **kwargs: Any):
        fmd_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith(PREFIX)}
        settings = FMDSettings.from_kwargs(fmd_kwargs)  # validate before building the model
        model = model_entrypoint(arch)(pretrained=pretrained, **kwargs)
        return apply_fmd(model, settings)

    fmd_model.__name__ = fmd_model.__qualname__ = PREFIX + arch
    fmd_model.__module__ = __name__
    fmd_model.__doc__ = f'{arch} with Feature Map Distortion (fmd_* keyword arguments: timm_fmd.FMDSettings).'
    return fmd_model


def register_fmd_models(archs: Optional[Iterable[str]] = None) -> int:
    """Register an ``fmd_`` twin for each architecture in ``archs`` (default: all of timm's) that lacks one."""
    archs = timm.list_models() if archs is None else archs
    count = 0
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # re-registration notices
        for arch in archs:
            if arch.startswith(PREFIX) or PREFIX + arch in _model_entrypoints:
                continue
            cfgs = get_arch_pretrained_cfgs(arch)
            if cfgs:
                tags = deque(split_model_name_tag(name)[1] for name in cfgs)
                default_cfgs[PREFIX + arch] = DefaultCfg(
                    tags=tags, cfgs={split_model_name_tag(name)[1]: cfg for name, cfg in cfgs.items()})
            register_model(_entrypoint(arch))
            count += 1
    return count
