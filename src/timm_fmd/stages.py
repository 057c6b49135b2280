"""What timm says about a built model that FMD needs: its feature_info stages and its input size.

Both read timm's own metadata, also through the wrappers timm builds for ``features_only``, so
that ``fmd_stages`` mean the same stages and the probe forward runs at the size the model was
built for, however the model was created.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch.nn as nn
from timm.models import get_model_input_config, get_model_traits

__all__ = ['feature_stages', 'probe_input_size']


def feature_stages(model: nn.Module) -> List[Optional[str]]:
    """Module path in ``model`` of every feature_info stage, in order; ``None`` for a stage it lacks.

    All of the architecture's stages, as ``out_indices`` counts them, also in a ``features_only``
    model (whose feature_info keeps the full list). timm's feature wrappers move the modules the
    stages name: ``FeatureListNet`` / ``FeatureDictNet`` / ``FeatureHookNet`` flatten the first level of
    Sequential containers (``stages.2`` becomes ``stages_2``), ``FeatureGetterNet`` and a non-rewriting
    ``FeatureHookNet`` hold the whole model as a child (``model.blocks.3``, ``body.layer3``). A stage
    the wrapper cut off (past the last of its ``out_indices``) is ``None``.

    Raises:
        ValueError: ``model`` has no feature_info.
    """
    info = getattr(model, 'feature_info', None)
    if info is None:
        raise ValueError(f'{type(model).__name__} has no feature_info: FMD stages are timm feature_info entries')
    modules = dict(model.named_modules())
    return [_wrapped_path(modules, info[i]['module']) for i in range(len(info))]


def _wrapped_path(modules: Dict[str, nn.Module], name: str) -> Optional[str]:
    head, _, rest = name.partition('.')
    second, _, tail = rest.partition('.')
    flat = f'{head}_{second}' + (f'.{tail}' if tail else '') if second else name
    for path in (name, flat):
        if path in modules:
            return path
    for child in (p for p in modules if p and '.' not in p):  # the model held as one child of the wrapper
        if f'{child}.{name}' in modules:
            return f'{child}.{name}'
    return None


def probe_input_size(model: nn.Module) -> Tuple[int, ...]:
    """The input size the model was built for, e.g. ``(3, 224, 224)``.

    timm's current input config (``get_model_input_config``: the ``img_size`` the model was built
    with, else its pretrained cfg's ``input_size``); the channels from the input convolution where
    the model does not state ``in_chans`` (``in_chans`` changes the model, not its pretrained cfg).
    """
    config = get_model_input_config(model)
    channels, *spatial = config['input_size']
    if 'in_chans' not in get_model_traits(model):
        first = config.get('first_conv')
        first = first[0] if isinstance(first, (list, tuple)) else first
        try:
            conv = model.get_submodule(first) if first else None
        except AttributeError:
            conv = None
        if not isinstance(conv, nn.Conv2d):
            conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        channels = conv.in_channels if conv is not None else channels
    return (channels, *spatial)
