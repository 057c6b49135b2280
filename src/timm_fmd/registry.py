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

``features_only`` models get FMD at the same sites: the sites are found in timm's feature wrapper,
whose stage modules :func:`timm_fmd.stages.feature_stages` resolves (``feature_cls='fx'`` traces the
model, so there FMD goes in before the wrapper is built and its ops become nodes of the graph).

Registration is one closure and one ``register_model`` call per architecture, timed by
``benchmarks/bench_registry.py``. Architectures registered after ``import timm_fmd`` get their twin
from :func:`register_fmd_models`, or use :func:`timm_fmd.create_model` / :func:`timm_fmd.apply_fmd`.
"""
from __future__ import annotations

import warnings
from collections import deque
from functools import partial
from typing import Any, Callable, Dict, Iterable, Optional

import timm
import torch.nn as nn
from timm.models import FeatureGraphNet, get_arch_pretrained_cfgs, model_entrypoint, register_model
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
        if kwargs.get('features_only') and kwargs.get('feature_cls') in ('fx', FeatureGraphNet):
            # FX traces the model as it wraps it: FMD goes in first, and its sites become graph nodes
            kwargs['feature_cls'] = partial(_traced_with_fmd, settings=settings)
            return model_entrypoint(arch)(pretrained=pretrained, **kwargs)
        model = model_entrypoint(arch)(pretrained=pretrained, **kwargs)
        return apply_fmd(model, settings)

    fmd_model.__name__ = fmd_model.__qualname__ = PREFIX + arch
    fmd_model.__module__ = __name__
    fmd_model.__doc__ = f'{arch} with Feature Map Distortion (fmd_* keyword arguments: timm_fmd.FMDSettings).'
    return fmd_model


def _traced_with_fmd(model: nn.Module, settings: FMDSettings, **feature_cfg: Any) -> FeatureGraphNet:
    """timm's ``feature_cls='fx'`` wrapper around ``model`` with FMD applied before it is traced.

    The graph calls the ops as modules: they run, and :func:`timm_fmd.describe` lists them, but the graph
    is fixed, so FMD cannot follow later changes to it (nor be removed: build the model without FMD).
    """
    wrapper = FeatureGraphNet(apply_fmd(model, settings), **feature_cfg)
    wrapper.fmd_settings = settings  # a plain attribute, as on the models apply_fmd returns
    return wrapper


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
