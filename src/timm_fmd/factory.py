"""``timm_fmd.create_model``: ``timm.create_model`` that also restores FMD and names unknown models.

* ``hf-hub:ORG/NAME[@rev]`` and ``local-dir:PATH`` load through plain timm (weights, classes, data
  config), then the FMD settings recorded in the ``fmd`` section of config.json are applied again
  and the probability ramp is put where training left it, for further fine-tuning with the same
  regulariser. ``fmd_*`` keyword arguments override the recorded settings.
* Any other name is timm's, with ``fmd_*`` keyword arguments applied to plain names too
  (``create_model('resnet50', fmd_prob=0.1)`` builds ``fmd_resnet50``); an unknown architecture is a
  ``ValueError`` that suggests the closest registered names.
"""
from __future__ import annotations

import difflib
from typing import Any

import timm
import torch.nn as nn
from timm.models import is_model, parse_model_name, split_model_name_tag

from .hub.publish import fmd_kwargs, read_config
from .inject import apply_fmd
from .registry import PREFIX
from .ops.schedule import set_schedule_step

__all__ = ['create_model', 'check_model_name']


def check_model_name(model_name: str) -> str:
    """``model_name`` if timm can build it (a registered architecture, with or without a ``.tag``; ``hf-hub:`` and
    ``local-dir:`` names are not checked here); otherwise a ``ValueError`` naming the closest registered names."""
    source, model_id = parse_model_name(model_name)
    if source in ('hf-hub', 'local-dir'):
        return model_name
    arch, _ = split_model_name_tag(model_id)
    if not is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f'; did you mean {", ".join(close)}?' if close else '; see timm.list_models()'
        raise ValueError(f'unknown model {model_name!r}{hint}')
    return model_name


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Create a timm model, with FMD when the name, the published config or ``fmd_*`` arguments ask for it."""
    fmd = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith('fmd_')}
    source, model_id = parse_model_name(model_name)
    if source in ('hf-hub', 'local-dir'):
        config = read_config(model_name)
        recorded = fmd_kwargs(config, model_name) if 'fmd' in config else {}
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        if recorded or fmd:
            apply_fmd(model, **{**recorded, **fmd})
            steps = (config.get('fmd') or {}).get('global_steps')
            if recorded and steps:
                set_schedule_step(model, steps)
        return model
    check_model_name(model_name)
    arch, _ = split_model_name_tag(model_id)
    if fmd and not arch.startswith(PREFIX) and is_model(PREFIX + arch):
        model_name, arch = PREFIX + model_name, PREFIX + arch  # the twin puts FMD in as every build option needs
    model = timm.create_model(model_name, pretrained=pretrained, **({**kwargs, **fmd} if arch.startswith(PREFIX)
                                                                    else kwargs))
    return apply_fmd(model, **fmd) if fmd and not arch.startswith(PREFIX) else model
