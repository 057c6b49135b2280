"""Put FMD into a built model, take it out, and show where it is.

:func:`apply_fmd` finds the sites of the chosen stages (:mod:`timm_fmd.sites`) and attaches one op
per site (:mod:`timm_fmd.attach`), linked to the layer that consumes the site's output: into an
empty slot timm left at the site (``BatchNormAct2d.drop``, ResNet's ``drop_block``), else as a
child named ``fmd`` of the site module that a forward hook applies out of place (timm's in-place
adds and activations act on a new tensor).

Neither adds a parameter or a persistent buffer (each op's ramp buffers are non-persistent),
so ``state_dict`` keys and shapes stay those of the base architecture, and eval-mode outputs are
the base model's bit for bit (the op returns its input). When the model changes afterwards
(frozen or converted norms, a new classifier, pruned blocks), FMD follows the change at the next
training forward or says which sites it lost; :func:`fmd_ops`, :func:`describe` and
:func:`site_summary` always show the sites the next training forward runs.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models import register_notrace_module

from .attach import OPS, SiteGuard, attach, detach, fmd_roots, sync
from .ops.distortion import BlockFeatureMapDistortion, FeatureMapDistortion
from .ops.schedule import count_steps
from .sites import Site, find_sites
from .stages import feature_stages, probe_input_size
from .ops.validation import check_choice, check_non_negative, check_positive_int, check_prob

__all__ = ['FMDSettings', 'apply_fmd', 'remove_fmd', 'reapply_fmd', 'describe', 'site_summary', 'fmd_ops',
           'fmd_settings', 'oversized_blocks']

# FX feature extraction (timm's features_only / create_feature_extractor) must keep the op as a leaf.
register_notrace_module(FeatureMapDistortion)
register_notrace_module(BlockFeatureMapDistortion)

SITE_KINDS = ('conv', 'skip')


@dataclass(frozen=True)
class FMDSettings:
    """FMD settings of a model; the registry's ``fmd_<name>`` keyword arguments.

    Attributes:
        prob: target distortion probability (the realised fraction of distorted elements).
        block_size: block FMD with this block size on 2-D maps; ``None`` for element-wise FMD
            everywhere. Token and vector sites are always element-wise.
        stages: feature_info indices, like timm's ``out_indices`` (negatives count from the end).
        sites: which sites: ``'conv'`` (after each conv's normalisation) and/or ``'skip'`` (block outputs
            at residual additions).
        gamma, lam, steps, mode: see :func:`timm_fmd.ops.distortion.feature_map_distortion`.
        shared_mask: one block mask per sample shared by all channels.
        stage_scale: per chosen stage, a multiplier of ``prob`` (the authors used ``prob / 4`` in
            ResNet-50's layer3: ``stages=(-2, -1), stage_scale=(0.25, 1.0)``).
        ramp_steps: linear ramp of the probability from 0 over this many optimiser steps.
        input_size: input size of the probe forward that finds the sites; default the model's
            pretrained cfg ``input_size``.
    """

    prob: float = 0.1
    block_size: Optional[int] = 7
    stages: Tuple[int, ...] = (-2, -1)
    sites: Tuple[str, ...] = SITE_KINDS
    gamma: float = 1.0
    lam: float = 0.0
    steps: int = 1
    mode: str = 'approx'
    shared_mask: bool = False
    stage_scale: Optional[Tuple[float, ...]] = None
    ramp_steps: int = 0
    input_size: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        check_prob(self.prob, 'fmd_prob')
        if self.block_size is not None and self.block_size != 0:
            check_positive_int(self.block_size, 'fmd_block_size')
        else:
            set_('block_size', None)
        set_('stages', _int_tuple(self.stages, 'fmd_stages'))
        if not self.stages:
            raise ValueError('fmd_stages must name at least one feature_info stage, got ()')
        kinds = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        if not kinds:
            raise ValueError(f'fmd_sites must be a non-empty subset of {SITE_KINDS}, got {self.sites!r}')
        for kind in kinds:
            check_choice(kind, 'fmd_sites', SITE_KINDS)
        set_('sites', kinds)
        check_non_negative(self.gamma, 'fmd_gamma')
        check_non_negative(self.lam, 'fmd_lam')
        check_positive_int(self.steps, 'fmd_steps')
        check_choice(self.mode, 'fmd_mode', ('approx', 'exact'))
        if not isinstance(self.shared_mask, bool):
            raise TypeError(f'fmd_shared_mask must be a bool, got {self.shared_mask!r}')
        if self.stage_scale is not None:
            scale = tuple(check_non_negative(s, 'fmd_stage_scale') for s in self.stage_scale)
            if len(scale) != len(self.stages):
                raise ValueError(f'fmd_stage_scale needs one multiplier per stage in fmd_stages={self.stages}, '
                                 f'got {self.stage_scale!r}')
            for s in scale:
                check_prob(self.prob * s, 'fmd_prob * fmd_stage_scale')
            set_('stage_scale', scale)
        if isinstance(self.ramp_steps, bool) or not isinstance(self.ramp_steps, int) or self.ramp_steps < 0:
            raise ValueError(f'fmd_ramp_steps must be an int >= 0, got {self.ramp_steps!r}')
        if self.input_size is not None:
            set_('input_size', _int_tuple(self.input_size, 'fmd_input_size'))

    @classmethod
    def from_kwargs(cls, kwargs: Dict[str, Any]) -> 'FMDSettings':
        """Settings from ``fmd_*`` keyword arguments; an unknown ``fmd_`` name is an error."""
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in kwargs.items():
            name = key[4:] if key.startswith('fmd_') else key
            if name not in known:
                raise ValueError(f'unknown FMD argument {key!r}; accepted: {sorted("fmd_" + k for k in known)}')
            values[name] = value
        return cls(**values)

    def to_kwargs(self) -> Dict[str, Any]:
        """The ``fmd_*`` keyword arguments that rebuild these settings (JSON-friendly values)."""
        return {f'fmd_{k}': (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _int_tuple(value: Any, name: str) -> Tuple[int, ...]:
    items = (value,) if isinstance(value, int) else tuple(value)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f'{name} must be an int or a sequence of ints, got {value!r}')
    return items


def fmd_ops(model: nn.Module) -> List[Tuple[str, FeatureMapDistortion]]:
    """``(path, op)`` for every FMD op in ``model``, in module order: the ops the next training forward
    runs (FMD is first brought in line with any change made to the model, see :func:`reapply_fmd`)."""
    reapply_fmd(model)
    return [(path, m) for path, m in model.named_modules() if isinstance(m, FeatureMapDistortion)]


def fmd_settings(model: nn.Module) -> Optional[FMDSettings]:
    """The settings FMD was applied with, or ``None`` for a model without FMD."""
    return getattr(model, 'fmd_settings', None)


def apply_fmd(model: nn.Module, settings: Optional[FMDSettings] = None, **kwargs: Any) -> nn.Module:
    """Inject FMD into ``model`` (in place) and return it.

    Args:
        model: a timm model (anything with ``feature_info``).
        settings: an :class:`FMDSettings`, or give its fields as keyword arguments (``prob=0.07``
            or ``fmd_prob=0.07``).
    """
    if settings is None:
        settings = FMDSettings.from_kwargs(kwargs)
    elif kwargs:
        raise TypeError('give either settings or keyword arguments, not both')
    if fmd_settings(model) is not None:
        raise ValueError('model already has FMD; call timm_fmd.remove_fmd(model) first')
    sites = find_sites(model, settings.stages, settings.sites, settings.input_size)
    paths = feature_stages(model)
    names = [model.feature_info[i]['module'] for i in range(len(paths))]
    chosen = sorted({s % len(names) for s in settings.stages})
    cut = [names[i] for i in chosen if paths[i] is None]
    where = f'{type(model).__name__}' + (f' (stage(s) {cut} are cut off: a features_only model ends at its last '
                                         f'out_indices stage)' if cut else '')
    if not sites:
        raise ValueError(f'no FMD site ({"/".join(settings.sites)}) found in stages {settings.stages} = '
                         f'{ {i: names[i] for i in chosen} } of {where}; its feature_info stages are {names}')
    if cut:
        warnings.warn(f'FMD: no site in feature_info stage(s) {cut}: they are not in this {type(model).__name__} '
                      f'(a features_only model ends at its last out_indices stage)')
    empty = [names[i] for i in chosen if paths[i] is not None and i not in {site.stage for site in sites}]
    if empty:
        warnings.warn(f'FMD: no site in feature_info stage(s) {empty} of {type(model).__name__}')
    scale = dict(zip((s % len(names) for s in settings.stages), settings.stage_scale or [1.0] * len(names)))
    for site in sites:
        op = _make_op(settings, site, settings.prob * scale[site.stage])
        if site.next_layer is not None:
            op.link(model.get_submodule(site.next_layer))
        attach(model, op)
    model.register_forward_pre_hook(SiteGuard(model))
    model.fmd_settings = settings  # a plain attribute: not in state_dict
    count_steps(model)  # the ramp counts the steps of the optimisers that hold the model's parameters
    return model


def _make_op(settings: FMDSettings, site: Site, prob: float) -> FeatureMapDistortion:
    common = dict(gamma=settings.gamma, lam=settings.lam, steps=settings.steps, mode=settings.mode,
                  layout=site.layout, ramp_steps=settings.ramp_steps)
    if settings.block_size is not None and site.layout in ('NCHW', 'NHWC'):
        op = BlockFeatureMapDistortion(prob, settings.block_size, shared_mask=settings.shared_mask, **common)
    else:
        op = FeatureMapDistortion(prob, **common)
    op.site = site
    return op


def reapply_fmd(model: nn.Module) -> int:
    """Bring FMD in line with changes made to ``model`` now, rather than at the next training forward.

    Each op still in the model keeps its place (hooks a conversion dropped are re-installed); an
    op whose module was replaced follows its site into the module now at that path; next layers are
    re-linked likewise; what cannot be followed is lost with a warning naming it (the rules:
    :mod:`timm_fmd.attach`). Works through wrappers (DistributedDataParallel, an EMA holder).
    Returns how many sites were re-attached, re-hooked or re-linked.
    """
    return sum(sync(root) for _, root in list(fmd_roots(model)))


def remove_fmd(model: nn.Module) -> nn.Module:
    """Take FMD out of ``model`` (in place): slots get their ``nn.Identity`` back, hooks go."""
    if fmd_settings(model) is None:
        raise ValueError('model has no FMD to remove')
    if OPS not in model.__dict__:
        raise ValueError(f'FMD is traced into this {type(model).__name__} (features_only with feature_cls="fx"); '
                         f'create the model without fmd_* arguments for one without FMD')
    sync(model)
    for op in list(model.__dict__[OPS]):
        detach(model, op)
    for key in [k for k, h in model._forward_pre_hooks.items() if isinstance(h, SiteGuard)]:
        del model._forward_pre_hooks[key]
    del model.fmd_settings, model.__dict__[OPS]
    count_steps(model)  # no ops left: no longer counted
    return model


def site_summary(model: nn.Module) -> str:
    """One line per feature_info stage: how many conv and skip sites the next training forward runs.

    E.g. ``FMD: 14 sites (12 linked to a next layer, 2 use the fixed weight 0.01)`` followed by
    ``  stage 3 (layer3): 5 conv, 2 skip``. Works through wrappers; a model without FMD says so.
    """
    ops = fmd_ops(model)
    if not ops:
        return f'FMD: no sites in {type(model).__name__} (FMD is OFF)'
    info = getattr(_holder(model), 'feature_info', None) or []
    names = {i: info[i]['module'] for i in range(len(info))}
    counts: Dict[int, Dict[str, int]] = {}
    for _, op in ops:
        kinds = counts.setdefault(op.site.stage, {})
        kinds[op.site.kind] = kinds.get(op.site.kind, 0) + 1
    linked = sum(op.site.next_layer is not None for _, op in ops)
    fixed = len(ops) - linked
    lines = [f'FMD: {len(ops)} sites ({linked} linked to a next layer, {fixed} {"uses" if fixed == 1 else "use"} '
             f'the fixed weight 0.01)']
    for stage in sorted(counts):
        kinds = ', '.join(f'{counts[stage][k]} {k}' for k in SITE_KINDS if k in counts[stage])
        lines.append(f'  stage {stage} ({names.get(stage, "?")}): {kinds}')
    return '\n'.join(lines)


def describe(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> str:
    """A table of every FMD site: module, kind, stage, feature shape at ``input_size``, probabilities,
    block size and the next layer it is linked to. A model without FMD says so."""
    ops = fmd_ops(model)
    if not ops:
        return f'{type(model).__name__}: no FMD sites (FMD is OFF)'
    shapes = _site_shapes(model, ops, input_size) if input_size is not None else {p: op.site.shape for p, op in ops}
    holder = _holder(model)
    settings = fmd_settings(holder)
    size = tuple(input_size) if input_size is not None else (
        (settings.input_size if settings else None) or probe_input_size(holder))
    header = ('site', 'stage', 'kind', 'module', 'shape', 'prob now/target', 'expected', 'last', 'block', 'mode',
              'next layer')
    rows = []
    for i, (path, op) in enumerate(ops):
        shape = shapes.get(path, op.site.shape)
        expected = op.current_prob
        if isinstance(op, BlockFeatureMapDistortion):
            expected = op.expected_fraction(*_map_size(op, shape))
        last = op.realised_fraction()
        rows.append((str(i), str(op.site.stage), op.site.kind, path, 'x'.join(map(str, shape[1:])),
                     f'{op.current_prob:.4g}/{op.prob:.4g}', f'{expected:.4f}', '-' if last is None else f'{last:.4f}',
                     (str(op.block_size) if op.block_size else 'elem') + (' shared' if op.shared_mask else ''),
                     op.mode, op.site.next_layer or '(none: w=0.01)'))
    widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header))]
    line = lambda r: '  '.join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    title = (f'{type(model).__name__}: {len(ops)} FMD sites at input {size}, ramp '
             f'{int(ops[0][1].ramp_count)}/{ops[0][1].ramp.steps} steps, gamma={settings.gamma if settings else "?"}')
    legend = ('expected: the fraction of the map the op distorts at the current probability; last: the fraction '
              'it distorted in its last training forward (- before the first)')
    return '\n'.join([title, line(header), line(tuple('-' * w for w in widths))] + [line(r) for r in rows] + [legend])


def _map_size(op: FeatureMapDistortion, shape: Sequence[int]) -> Tuple[int, int]:
    return (shape[2], shape[3]) if op.site.layout == 'NCHW' else (shape[1], shape[2])


def oversized_blocks(model: nn.Module, input_size: Sequence[int]) -> List[str]:
    """One warning per (block, map size) where a block FMD site's feature map at ``input_size`` (C, H, W) is
    smaller than the block. The op clamps the block to the map (as DropBlock does), so each block then
    covers the map's whole height or width: rarely what the block size was chosen for."""
    ops = [(path, op) for path, op in fmd_ops(model) if isinstance(op, BlockFeatureMapDistortion)]
    if not ops:
        return []
    shapes = _site_shapes(model, ops, input_size)
    small: Dict[Tuple[int, int, int], List[str]] = {}
    for path, op in ops:
        h, w = _map_size(op, shapes.get(path, op.site.shape))
        if op.block_size > min(h, w):
            small.setdefault((op.block_size, h, w), []).append(path)
    return [f'FMD block size {block} exceeds the {h}x{w} feature maps of {len(paths)} site(s) '
            f'({paths[0]}{", ..." if len(paths) > 1 else ""}) at input {tuple(input_size)}: clamped to '
            f'{min(block, h)}x{min(block, w)} there; --fmd-block-size {min(h, w)} or less fits them'
            for (block, h, w), paths in small.items()]


def _holder(model: nn.Module) -> nn.Module:
    """The model FMD was applied to: ``model`` itself or one it wraps (DistributedDataParallel, EMA)."""
    return next((m for m in model.modules() if fmd_settings(m) is not None), model)


def _site_shapes(model: nn.Module, ops, input_size: Sequence[int]) -> Dict[str, Tuple[int, ...]]:
    """Feature shape at every op for an input of ``input_size`` (one eval forward, batch 1)."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    handles = [op.register_forward_pre_hook(lambda m, a, p=path: shapes.__setitem__(p, tuple(a[0].shape)))
               for path, op in ops]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=param.device if param is not None else 'cpu'))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes
