"""ERC diagnostics: the empirical Rademacher complexity of a model's layers on real data.

FMD aims at the ERC of the layer that consumes each distorted map, ``o^{l+1} = K^{l+1} f^l``
(Theorem 2, Eq. 9 and its convolutional form Eq. 21). :func:`erc_layers` names those layers --
the next layers of the model's FMD sites, or, for a model without FMD, of the sites FMD would use
with the given stages -- so runs with and without FMD are measured at the same places.
:func:`layer_erc` estimates each layer's ERC batch by batch (``timm_fmd.ops.erc.empirical_rademacher_complexity``)
and averages over batches; its standard error is the spread of the per-batch estimates. The ERC
scales as ``1/N`` with the batch size ``N``: compare numbers measured at the same batch size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..ops.erc import empirical_rademacher_complexity
from ..inject import fmd_ops
from ..sites import find_sites
from .config import FMD_DEFAULTS

__all__ = ['erc_layers', 'layer_erc', 'erc_checkpoint']


def erc_layers(model: nn.Module, stages: Sequence[int] = (-1,), kinds: Sequence[str] = ('conv',)) -> List[str]:
    """Module paths whose outputs FMD's objective is about: the next layers of the FMD sites."""
    ops = fmd_ops(model)
    nexts = [op.site.next_layer for _, op in ops] if ops else \
        [s.next_layer for s in find_sites(model, tuple(stages), tuple(kinds))]
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    layers = sorted({n for n in nexts if n is not None}, key=order.__getitem__)  # unique, in module order
    if not layers:
        raise ValueError('no layer to measure: no FMD site of this model links to a next layer; name the layers with '
                         '--layers (Python: layers=)')
    return layers


@torch.no_grad()
def layer_erc(
        model: nn.Module,
        batches: Iterable[Any],
        layers: Sequence[str],
        *,
        max_batches: int = 4,
        draws: int = 128,
        seed: int = 0,
        device: Optional[torch.device] = None,
) -> Dict[str, Tuple[float, float]]:
    """ERC of each layer's outputs, ``{path: (mean, standard error)}``, over the first ``max_batches``.

    ``batches`` yields ``(images, ...)`` tuples; the model runs in eval mode (no distortion), and the
    Rademacher draws come from their own generator seeded with ``seed``, leaving the global RNG alone.
    """
    if max_batches < 1:
        raise ValueError(f'max_batches must be >= 1, got {max_batches}')
    modules = dict(model.named_modules())
    unknown = [p for p in layers if p not in modules]
    if unknown:
        raise ValueError(f'layers {unknown} are not modules of {type(model).__name__}')
    device = device or next(model.parameters()).device
    captured: Dict[str, torch.Tensor] = {}
    handles = [modules[p].register_forward_hook(lambda m, a, out, p=p: captured.__setitem__(p, out))
               for p in layers]
    generator = torch.Generator(device=device).manual_seed(seed)
    per_batch: Dict[str, List[float]] = {p: [] for p in layers}
    mc_error: Dict[str, List[float]] = {p: [] for p in layers}
    was_training = model.training
    try:
        model.eval()
        for i, batch in enumerate(batches):
            if i == max_batches:
                break
            model(batch[0].to(device))
            for p in layers:
                mean, se = empirical_rademacher_complexity(captured[p], draws, generator=generator)
                per_batch[p].append(mean)
                mc_error[p].append(se)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    result = {}
    for p in layers:
        values = torch.tensor(per_batch[p], dtype=torch.float64)
        n = len(values)
        if n == 0:
            raise ValueError('no batch to measure the ERC on')
        # across batches when there are several; with one batch, the Monte-Carlo error alone
        se = (values.std() / n ** 0.5).item() if n > 1 else mc_error[p][0]
        result[p] = (values.mean().item(), se)
    return result


def erc_checkpoint(
        checkpoint: Union[str, Path],
        *,
        data_dir: Optional[str] = None,
        layers: Optional[Sequence[str]] = None,
        max_batches: int = 8,
        draws: int = 256,
        batch_size: Optional[int] = None,
        device: Optional[str] = None,
) -> Dict[str, Any]:
    """``timm-fmd erc``: the ERC of a saved run's layers on its validation split (see :func:`layer_erc`);
    ``checkpoint`` is ``RUN_DIR/checkpoints/<name>.safetensors`` or ``RUN_DIR`` (its best checkpoint)."""
    from .evaluate import load_run, resolve_checkpoint  # the run rebuilt as `timm-fmd eval` rebuilds it
    checkpoint = resolve_checkpoint(checkpoint)
    with load_run(checkpoint, data_dir=data_dir, batch_size=batch_size, device=device) as run:
        names = list(layers) if layers else erc_layers(run.model, run.cfg.fmd_stages or FMD_DEFAULTS.stages,
                                                       run.cfg.fmd_sites or FMD_DEFAULTS.sites)
        values = layer_erc(run.model, run.loaders.val, names, max_batches=max_batches, draws=draws,
                           seed=run.cfg.seed, device=run.env.device)
        size = run.cfg.validation_batch_size or run.cfg.batch_size
    return dict(checkpoint=str(checkpoint), batch_size=size, batches=max_batches, draws=draws,
                erc={p: dict(mean=m, se=s) for p, (m, s) in values.items()})
