"""The model of a run: ``timm.create_model`` with the fmd_* kwargs and a pretrained source.

The trainer knows nothing of FMD internals: an ``fmd_<arch>`` name gets the ``fmd_*`` settings as
keyword arguments (the registry builds the model), any other name gets none.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Union

import timm
import torch.nn as nn
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError

import timm_fmd
from timm.models import load_state_dict, split_model_name_tag

from .config import TrainConfig, fmd_kwargs

__all__ = ['is_fmd', 'base_architecture', 'create_model', 'pretrained_source']

_logger = logging.getLogger(__name__)


def is_fmd(model_name: str) -> bool:
    return model_name.startswith('fmd_')


def base_architecture(model_name: str, model: Optional[nn.Module] = None) -> str:
    """The timm architecture behind ``model_name``: no ``fmd_`` prefix, no ``.tag``."""
    if model_name.startswith('hf-hub:') and model is not None:
        model_name = model.pretrained_cfg['architecture']
    return timm_fmd.base_architecture(model_name)


def create_model(cfg: TrainConfig, num_classes: int, steps_per_epoch: int, pretrained: bool = True) -> nn.Module:
    """Build ``cfg.model`` with ``num_classes`` outputs; with ``pretrained``, load ``cfg.pretrained``.

    Pretrained sources: ``True`` (the timm weights the model name's tag selects), ``arch.tag`` or
    ``.tag`` (that timm tag), ``hf-hub:org/repo``, or a local weights file (safetensors or a torch
    checkpoint). The classifier is reset whenever its shape differs from the data set's classes.
    """
    kwargs: Dict[str, Any] = dict(cfg.model_kwargs, num_classes=num_classes)
    if is_fmd(cfg.model):
        kwargs.update(fmd_kwargs(cfg, steps_per_epoch))
    source = cfg.pretrained if pretrained else False
    if source is False:
        return timm.create_model(cfg.model, **kwargs)
    path = Path(source).expanduser() if isinstance(source, str) else None
    if path is not None and path.is_file():
        model = timm.create_model(cfg.model, **kwargs)
        _load_file(model, path)
        return model
    try:
        return _from_hub(cfg.model, source, kwargs)
    except (OSError, HfHubHTTPError) as e:  # offline, unreachable, unknown repo: the Hub client's errors
        raise ValueError(_hub_failure(cfg.model, source, e)) from e


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it: ``is_offline_mode()`` where it has one, the
    module constant in 1.0 (this project's floor)."""
    check = getattr(hub_constants, 'is_offline_mode', None)
    return check() if check is not None else bool(hub_constants.HF_HUB_OFFLINE)


def _hub_failure(model_name: str, source: Union[bool, str], error: Exception) -> str:
    """The one-line error for weights the Hub client could not get, with the advice that fits: offline mode
    on (the cache lacks them), the Hub refusing the request (an HTTP status), or the Hub unreachable."""
    named = f' ({source})' if isinstance(source, str) else ''  # the bare flag: the model name says it all
    detail = str(error).strip().splitlines()
    head = (f'--pretrained: cannot get the weights of {model_name}{named} from the Hugging Face Hub: '
            f'{type(error).__name__}: {detail[0] if detail else ""}').rstrip('.')
    status = getattr(getattr(error, 'response', None), 'status_code', None)
    if _hub_offline():
        advice = ('HF_HUB_OFFLINE is set, so only the local cache is searched, and it does not hold them: download '
                  'them once with a connection and HF_HUB_OFFLINE unset')
    elif status is not None:
        advice = (f'The Hub answered HTTP {status}: check the name (timm.list_pretrained()) and, for a private or '
                  f'gated repository, HF_TOKEN')
    else:  # the client falls back to its cache when the Hub is unreachable: these weights are not in it
        advice = ('The Hub cannot be reached and the local cache does not hold them: check the connection (and '
                  'HF_ENDPOINT)')
    return f'{head}. {advice}, or pass a local weights file: --pretrained PATH'


def _from_hub(model_name: str, source: Union[bool, str], kwargs: Dict[str, Any]) -> nn.Module:
    if source is True:
        return timm.create_model(model_name, pretrained=True, **kwargs)
    if source.startswith('hf-hub:'):
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=source[7:]),
                                 **kwargs)
    tag = split_model_name_tag(source)[1]
    if not tag:
        raise ValueError(f'--pretrained: {source!r} is not a file, an hf-hub:org/repo source or a timm arch.tag')
    return timm.create_model(model_name, pretrained=True, pretrained_cfg=tag, **kwargs)


def _load_file(model: nn.Module, path: Path) -> None:
    """Load weights from a file, dropping tensors whose shape differs (the classifier of another task)."""
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as e:
        raise ValueError(f'--pretrained: cannot read weights from {path}: {e}') from e
    own = model.state_dict()
    reset = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    for k in reset:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - set(reset))
    if missing or unexpected:
        raise ValueError(f'--pretrained: {path} does not fit {model.__class__.__name__}: missing keys '
                         f'{missing[:5]}, unexpected keys {sorted(unexpected)[:5]}')
    if reset:
        _logger.info('pretrained %s: re-initialised %s (shape differs)', path, reset)


def pretrained_source(cfg: TrainConfig, model: nn.Module) -> Optional[str]:
    """The pretrained source for results.json: a timm ``arch.tag``, ``hf-hub:...``, a path, or ``None``."""
    if cfg.pretrained is False:
        return None
    if cfg.pretrained is True:
        tag = getattr(model, 'pretrained_cfg', {}).get('tag')
        arch = base_architecture(cfg.model, model)
        return f'{arch}.{tag}' if tag else arch
    return cfg.pretrained
