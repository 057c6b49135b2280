"""Training settings: one dataclass, YAML files, command-line overrides, validation.

Precedence, lowest first: the dataclass defaults, a YAML recipe, then command-line options. The
defaults fit whatever model and data are named: the model's own data config (input size,
interpolation, mean/std, crop), timm's training augmentation and learning-rate rule, and the FMD
settings of the registry (:class:`timm_fmd.FMDSettings`). On the command line, naming neither
``--config`` nor ``--data-dir`` (nor ``--resume``) applies the embedded ``digits`` recipe
(:data:`DIGITS_RECIPE`, also ``configs/digits.yaml``), so that a bare ``timm-fmd train`` trains
something real. Option names follow timm's ``train.py`` (``--lr``, ``--sched``, ``--model-ema``,
...); a field ``foo_bar`` is the option ``--foo-bar`` and the YAML key ``foo_bar``.

A YAML recipe may start with ``base: other.yaml`` (a path relative to the including file): the base
is loaded first and the including file's keys override it. This keeps a baseline recipe to the few
keys in which it differs from its FMD twin.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import yaml
from timm.models import split_model_name_tag
from timm.optim import list_optimizers

from ..factory import check_model_name
from ..inject import FMDSettings

__all__ = ['TrainConfig', 'load_yaml', 'config_from_dict', 'merge', 'validate', 'save_config', 'fmd_kwargs',
           'add_arguments', 'config_from_args', 'resolved_lr', 'FMD_FIELDS', 'DIGITS_RECIPE']

DIGITS_RECIPE = Path(__file__).resolve().parents[1] / 'data' / 'digits.yaml'
FMD_DEFAULTS = FMDSettings()  # the registry's: the defaults of every fmd_* setting left unset

SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'wsd', 'rsqrt', 'none')
TRAIN_CROP_MODES = ('pad', 'rrc', 'rkrc', 'rkrr')
EVAL_METRICS = ('top1', 'top5', 'loss')
FMD_MODES = ('approx', 'exact')
FMD_SITES = ('conv', 'skip')


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field carrying its command-line help (and optional ``choices``/``flags``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=dict(help=help, **meta))
    return field(default=default, metadata=dict(help=help, **meta))


@dataclass
class TrainConfig:
    """Every setting of a training run. ``None`` means "the model's own" for input settings, "the
    registry's" (:class:`timm_fmd.FMDSettings`) for ``fmd_*`` settings, and timm's rule for ``lr``."""

    # --- data
    data_dir: Optional[str] = _f(None, 'ImageFolder directory (train/ and val/ or test/ inside, or class folders '
                                       'only) or a .tar of one; none = the embedded 8x8 digits data set')
    train_split: str = _f('train', 'name of the training split (folder or <name>.tar under --data-dir)')
    val_split: Optional[str] = _f(None, 'name of the validation split; none = val, validation, test in that '
                                        'order, else carved from the training split')
    carve_fraction: float = _f(0.1, 'fraction of the training split held out when a validation split is carved')
    carve_seed: int = _f(0, 'seed of the carved validation split (independent of --seed)')
    train_subset: Optional[int] = _f(None, 'train on a seeded random subset of this many training images (a '
                                          'small-data regime); none = all of them')
    subset_seed: int = _f(0, 'seed of --train-subset (independent of --seed)')
    skip_corrupt: bool = _f(False, 'skip unreadable images with a counted warning instead of stopping')
    workers: int = _f(2, 'data loader worker processes per rank', flags=('-j', '--workers'))
    pin_mem: bool = _f(False, 'pin CPU memory of batches (faster host-to-GPU copies)')

    # --- model
    model: str = _f('fmd_cifar_resnet20', 'timm model name; an fmd_<arch> name turns Feature Map Distortion on')
    pretrained: Union[bool, str] = _f(False, 'start from pretrained weights: bare flag = the timm weights named by '
                                             '--model (arch.tag), or a source: arch.tag, hf-hub:org/repo, or a file',
                                     const='true')
    model_kwargs: Dict[str, Any] = _f({}, 'extra keyword arguments for timm.create_model, as k=v (v parsed as '
                                          'YAML), e.g. drop_rate=0.5 drop_block_rate=0.1')

    # --- input and augmentation
    img_size: Optional[int] = _f(None, 'input image size (square); none = the model\'s pretrained_cfg input size')
    mean: Optional[List[float]] = _f(None, 'normalisation mean per channel; none = the model\'s')
    std: Optional[List[float]] = _f(None, 'normalisation std per channel; none = the model\'s')
    interpolation: Optional[str] = _f(None, 'resize interpolation; none = the model\'s')
    crop_pct: Optional[float] = _f(None, 'evaluation centre-crop fraction; none = the model\'s')
    no_aug: bool = _f(False, 'no training augmentation (evaluation transform for training too)')
    train_crop_mode: str = _f('rrc', 'training crop: pad (pad + random crop, CIFAR style) or timm\'s rrc / rkrc / '
                                     'rkrr (random resized crop variants)', choices=TRAIN_CROP_MODES)
    crop_pad: int = _f(4, 'padding in pixels of the pad crop mode')
    scale: Optional[List[float]] = _f(None, 'random-resized-crop area range (min max); none = timm\'s')
    ratio: Optional[List[float]] = _f(None, 'random-resized-crop aspect range (min max); none = timm\'s')
    hflip: float = _f(0.5, 'horizontal flip probability')
    vflip: float = _f(0.0, 'vertical flip probability')
    rotate: float = _f(0.0, 'random rotation range in degrees (+-)')
    color_jitter: float = _f(0.0, 'colour jitter strength (unused with --aa)')
    aa: Optional[str] = _f(None, 'AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5-inc1 or v0')
    reprob: float = _f(0.0, 'random erasing probability')
    remode: str = _f('pixel', 'random erasing mode', choices=('const', 'rand', 'pixel'))
    recount: int = _f(1, 'random erasing count')
    mixup: float = _f(0.0, 'mixup alpha (0 = off)')
    cutmix: float = _f(0.0, 'cutmix alpha (0 = off)')
    mixup_prob: float = _f(1.0, 'probability of mixup or cutmix per batch')
    mixup_switch_prob: float = _f(0.5, 'probability of cutmix instead of mixup when both are on')
    mixup_mode: str = _f('batch', 'how mixup/cutmix parameters are drawn', choices=('batch', 'pair', 'elem'))
    smoothing: float = _f(0.0, 'label smoothing')

    # --- optimisation
    epochs: int = _f(12, 'number of epochs')
    batch_size: int = _f(64, 'batch size per process', flags=('-b', '--batch-size'))
    validation_batch_size: Optional[int] = _f(None, 'validation batch size; none = --batch-size')
    grad_accum_steps: int = _f(1, 'micro-batches accumulated per optimiser step')
    opt: str = _f('momentum', 'timm optimiser name (momentum = SGD with momentum, sgd = SGD with Nesterov)')
    lr: Optional[float] = _f(None, 'learning rate; none = timm\'s rule: 0.1 x global batch / 256 (square root of '
                                   'the ratio for adaptive optimisers: ada*, lamb)')
    momentum: float = _f(0.9, 'optimiser momentum')
    weight_decay: float = _f(5e-4, 'weight decay')
    opt_kwargs: Dict[str, Any] = _f({}, 'extra optimiser keyword arguments, as k=v')
    clip_grad: Optional[float] = _f(None, 'gradient clipping threshold; none = off')
    clip_mode: str = _f('norm', 'gradient clipping mode', choices=('norm', 'value', 'agc'))
    sched: str = _f('cosine', 'learning-rate schedule', choices=SCHEDULERS)
    sched_on_updates: bool = _f(True, 'update the schedule every optimiser step instead of every epoch')
    decay_epochs: float = _f(30.0, 'epochs between decays of the step schedule')
    decay_milestones: List[int] = _f([60, 120, 160], 'epochs at which the multistep schedule decays')
    decay_rate: float = _f(0.1, 'learning-rate decay factor of step / multistep')
    warmup_epochs: int = _f(1, 'linear warm-up epochs')
    warmup_lr: float = _f(1e-5, 'learning rate at the start of warm-up')
    min_lr: float = _f(0.0, 'floor of cyclic schedules (cosine, ...)')

    # --- precision and speed
    amp: bool = _f(False, 'automatic mixed precision')
    amp_dtype: str = _f('float16', 'AMP data type', choices=('float16', 'bfloat16'))
    channels_last: bool = _f(False, 'channels-last memory layout')
    torchcompile: Optional[str] = _f(None, 'torch.compile the model with this backend (bare flag = inductor)',
                                     const='inductor')
    device: str = _f('auto', 'auto, cpu, cuda or cuda:N (under torchrun each rank takes cuda:LOCAL_RANK)')
    sync_bn: bool = _f(False, 'synchronised BatchNorm across processes')
    model_ema: bool = _f(False, 'keep an exponential moving average of the weights and evaluate it')
    model_ema_decay: float = _f(0.9998, 'EMA decay')
    model_ema_warmup: bool = _f(False, 'EMA decay warm-up')
    data_on_device: bool = _f(False, 'decode the data set once (cached) and keep it as uint8 on the training device; '
                                     'augment there in batches (pad crop, flips, rotation; not --aa, --reprob, '
                                     '--color-jitter or random-resized crops)')
    cuda_graph: bool = _f(False, 'capture the training step (forward, backward, optimiser step, EMA) once in a CUDA '
                                 'graph and replay it (CUDA only; SGD/Adam/AdamW, no fp16 --amp-dtype, no '
                                 '--grad-accum-steps)')

    # --- Feature Map Distortion (passed as fmd_* kwargs to create_model for an fmd_<arch> model)
    fmd_prob: Optional[float] = _f(None, 'target distortion probability p')
    fmd_block_size: Optional[int] = _f(None, 'block size of block FMD (clamped to smaller maps, with a warning at '
                                             'start-up); 0 = element-wise FMD')
    fmd_stages: Optional[List[int]] = _f(None, 'feature_info stage indices to distort (negatives count from the end)')
    fmd_sites: Optional[List[str]] = _f(None, 'where to distort within a stage: conv and/or skip')
    fmd_gamma: Optional[float] = _f(None, 'step length gamma of the distortion update')
    fmd_lam: Optional[float] = _f(None, 'weight lambda of the Rademacher term')
    fmd_steps: Optional[int] = _f(None, 'distortion update steps per forward')
    fmd_mode: Optional[str] = _f(None, 'distortion solver', choices=FMD_MODES)
    fmd_shared_mask: Optional[bool] = _f(None, 'one mask shared across channels')
    fmd_stage_scale: Optional[List[float]] = _f(None, 'probability multiplier per chosen stage')
    fmd_ramp_epochs: Optional[float] = _f(None, 'epochs of the linear ramp of p from 0 (converted to optimiser '
                                                'steps); none = the registry\'s ramp_steps')

    # --- run
    output: str = _f('output/train', 'parent directory of run directories')
    experiment: Optional[str] = _f(None, 'run directory name; none = <model>-<YYYYmmdd-HHMMSS>')
    resume: Optional[str] = _f(None, 'continue the run in this run directory from its last checkpoint')
    checkpoint_interval: int = _f(1000, 'also checkpoint every N optimiser steps (0 = epoch ends only)')
    eval_metric: str = _f('top1', 'validation metric choosing the best checkpoint', choices=EVAL_METRICS)
    log_interval: int = _f(50, 'optimiser steps between progress statistics (a terminal\'s bar moves every step)')
    erc_every: int = _f(0, 'every N epochs (and after the last), estimate the empirical Rademacher complexity of the '
                           'layers after the FMD sites on the validation split (0 = off)')
    erc_batches: int = _f(4, 'validation batches of each ERC estimate')
    erc_draws: int = _f(128, 'Rademacher sign vectors per batch of each ERC estimate')
    seed: int = _f(0, 'random seed')


FMD_FIELDS = ('prob', 'block_size', 'stages', 'sites', 'gamma', 'lam', 'steps', 'mode', 'shared_mask',
              'stage_scale')
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


# ----------------------------------------------------------------------------------------- coercion
def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (from YAML, or a raw command-line string) to the field type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None or (isinstance(value, str) and value.lower() in ('none', 'null')):
            if type(None) in args:
                return None
            raise ValueError(f'{_opt(name)} cannot be none')
        members = [a for a in args if a is not type(None)]
        if members == [bool, str]:  # --pretrained: a flag or a source
            if isinstance(value, bool):
                return value
            if isinstance(value, str):
                low = value.lower()
                return {'true': True, 'false': False}.get(low, value)
            raise ValueError(f'{_opt(name)} must be true/false or a source string, got {value!r}')
        return _coerce(name, members[0], value)
    if origin in (list, List):
        if isinstance(value, str):
            value = value.replace(',', ' ').split()
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(name, args[0], v) for v in value]
    if origin in (dict, Dict):
        if isinstance(value, (list, tuple)):  # command line: ['k=v', ...]
            value = dict(_key_value(name, kv) for kv in value)
        if not isinstance(value, Mapping):
            raise ValueError(f'{_opt(name)} must be a mapping (k=v ...), got {value!r}')
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ('true', 'false', 'yes', 'no', '1', '0'):
            return value.lower() in ('true', 'yes', '1')
        raise ValueError(f'{_opt(name)} must be true or false, got {value!r}')
    if tp in (int, float):
        noun = 'an integer' if tp is int else 'a number'
        # bool is an int subclass and 2.5 would silently truncate: both are refused, not coerced
        if isinstance(value, bool) or tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f'{_opt(name)} must be {noun}, got {value!r}')
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ValueError(f'{_opt(name)} must be {noun}, got {value!r}') from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f'{_opt(name)} must be a string, got {value!r}')
        return str(value)
    raise TypeError(f'unsupported field type {tp} of {name}')


def _key_value(name: str, item: str) -> tuple:
    key, sep, raw = item.partition('=')
    if not sep or not key:
        raise ValueError(f'{_opt(name)} takes k=v items, got {item!r}')
    return key, yaml.safe_load(raw)


def _opt(name: str) -> str:
    return f"--{name.replace('_', '-')}"


# ------------------------------------------------------------------------------------ building configs
def load_yaml(path: Union[str, os.PathLike], _seen: tuple = ()) -> Dict[str, Any]:
    """The settings of a YAML recipe as a dict, with its ``base:`` chain merged in (base first)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f'config {path}: base: cycle through {" -> ".join(map(str, _seen))}')
    if not path.is_file():
        raise FileNotFoundError(f'config file not found: {path}')
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f'config {path}: expected a mapping of settings, got {type(data).__name__}')
    base = data.pop('base', None)
    merged = load_yaml(path.parent / base, _seen + (path,)) if base else {}
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(f'config {path}: unknown setting(s) {unknown}; see `timm-fmd train --help`')
    merged.update(data)
    return merged


def merge(cfg: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """A copy of ``cfg`` with ``overrides`` (field name -> value, YAML or raw string) applied and coerced."""
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ValueError(f'unknown setting(s) {unknown}')
    return dataclasses.replace(cfg, **{k: _coerce(k, _TYPES[k], v) for k, v in overrides.items()})


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """Defaults overridden by ``values`` (e.g. a loaded ``config.yaml``), validated."""
    return validate(merge(TrainConfig(), values))


def save_config(cfg: TrainConfig) -> str:
    """The fully resolved config as YAML text (every field, in declaration order)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def fmd_kwargs(cfg: TrainConfig, steps_per_epoch: int) -> Dict[str, Any]:
    """The ``fmd_*`` kwargs for ``timm.create_model`` (set fields only; the registry fills the rest)."""
    kwargs = {f'fmd_{k}': getattr(cfg, f'fmd_{k}') for k in FMD_FIELDS if getattr(cfg, f'fmd_{k}') is not None}
    for k in ('fmd_stages', 'fmd_sites', 'fmd_stage_scale'):
        if k in kwargs:
            kwargs[k] = tuple(kwargs[k])
    if cfg.fmd_ramp_epochs is not None:
        kwargs['fmd_ramp_steps'] = int(round(cfg.fmd_ramp_epochs * steps_per_epoch))
    return kwargs


def resolved_lr(cfg: TrainConfig, world_size: int = 1) -> float:
    """``cfg.lr``, or when it is none timm's ``train.py`` rule: ``lr_base`` 0.1 at a global batch of 256, scaled
    linearly with the global batch (batch x accumulation x processes), by its square root for ada*/lamb."""
    if cfg.lr is not None:
        return cfg.lr
    ratio = cfg.batch_size * cfg.grad_accum_steps * world_size / 256
    adaptive = any(name in cfg.opt.lower() for name in ('ada', 'lamb'))
    return 0.1 * (math.sqrt(ratio) if adaptive else ratio)


# ------------------------------------------------------------------------------------------ validation
def _check(ok: bool, name: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ValueError(f'{_opt(name)}: got {value!r}, expected {accepted}')


def validate(cfg: TrainConfig, origins: Optional[Mapping[str, str]] = None) -> TrainConfig:
    """Check every setting's range; raise ``ValueError`` naming the option. Returns ``cfg``.

    ``origins`` (field -> e.g. ``'the default'``) says where a refused value came from when the user did not
    type it (see :func:`config_from_args`)."""
    for name, f in _FIELDS.items():
        choices = f.metadata.get('choices')
        value = getattr(cfg, name)
        if choices and value is not None:
            _check(value in choices, name, value, f'one of {list(choices)}')
    _check(bool(cfg.model), 'model', cfg.model, 'a timm model name')
    try:  # before any data is read or directory written: the factory's message, with its suggestions
        check_model_name(cfg.model)
    except ValueError as e:
        raise ValueError(f'--model: {e}') from None
    _check(cfg.opt.lower() in list_optimizers(), 'opt', cfg.opt, 'a timm optimiser (timm.optim.list_optimizers())')
    for name in ('epochs', 'batch_size', 'grad_accum_steps', 'recount', 'log_interval', 'erc_batches'):
        _check(getattr(cfg, name) >= 1, name, getattr(cfg, name), 'an integer >= 1')
    for name in ('workers', 'checkpoint_interval', 'warmup_epochs', 'crop_pad', 'seed', 'carve_seed', 'subset_seed',
                 'erc_every'):
        _check(getattr(cfg, name) >= 0, name, getattr(cfg, name), 'an integer >= 0')
    for name in ('hflip', 'vflip', 'reprob', 'mixup_prob', 'mixup_switch_prob'):
        _check(0.0 <= getattr(cfg, name) <= 1.0, name, getattr(cfg, name), 'a probability in [0, 1]')
    _check(cfg.decay_epochs > 0, 'decay_epochs', cfg.decay_epochs, 'a number > 0')
    if cfg.lr is not None:
        _check(cfg.lr > 0, 'lr', cfg.lr, 'a number > 0 or none')
    for name in ('weight_decay', 'momentum', 'warmup_lr', 'min_lr', 'mixup', 'cutmix', 'rotate', 'color_jitter'):
        _check(getattr(cfg, name) >= 0, name, getattr(cfg, name), 'a number >= 0')
    if cfg.fmd_ramp_epochs is not None:
        _check(cfg.fmd_ramp_epochs >= 0, 'fmd_ramp_epochs', cfg.fmd_ramp_epochs, 'a number >= 0 or none')
    _check(0.0 <= cfg.smoothing < 1.0, 'smoothing', cfg.smoothing, 'a number in [0, 1)')
    _check(0.0 < cfg.carve_fraction < 1.0, 'carve_fraction', cfg.carve_fraction, 'a fraction in (0, 1)')
    _check(0.0 < cfg.model_ema_decay < 1.0, 'model_ema_decay', cfg.model_ema_decay, 'a number in (0, 1)')
    _check(cfg.decay_rate > 0, 'decay_rate', cfg.decay_rate, 'a number > 0')
    _check(cfg.decay_milestones == sorted(set(cfg.decay_milestones)) and all(m > 0 for m in cfg.decay_milestones),
           'decay_milestones', cfg.decay_milestones, 'strictly increasing epochs > 0')
    _check(cfg.erc_draws >= 2, 'erc_draws', cfg.erc_draws, 'an integer >= 2')
    if cfg.train_subset is not None:
        _check(cfg.train_subset >= 1, 'train_subset', cfg.train_subset, 'an integer >= 1 or none')
    if cfg.img_size is not None:
        _check(cfg.img_size >= 1, 'img_size', cfg.img_size, 'an integer >= 1 or none')
    if cfg.validation_batch_size is not None:
        _check(cfg.validation_batch_size >= 1, 'validation_batch_size', cfg.validation_batch_size, 'an integer >= 1')
    if cfg.crop_pct is not None:
        _check(0.0 < cfg.crop_pct <= 1.0, 'crop_pct', cfg.crop_pct, 'a fraction in (0, 1]')
    if cfg.clip_grad is not None:
        _check(cfg.clip_grad > 0, 'clip_grad', cfg.clip_grad, 'a number > 0 or none')
    for name in ('mean', 'std'):
        value = getattr(cfg, name)
        if value is not None:
            _check(len(value) in (1, 3), name, value, 'one or three numbers')
    for name in ('scale', 'ratio'):
        value = getattr(cfg, name)
        if value is not None:
            _check(len(value) == 2 and 0 < value[0] <= value[1], name, value, 'two numbers 0 < min <= max')
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ValueError(f'--batch-size: got {cfg.batch_size}, mixup/cutmix need an even batch size')
    _check(not any(k.startswith('fmd_') for k in cfg.model_kwargs), 'model_kwargs', cfg.model_kwargs,
           'no fmd_* keys (use the --fmd-* options)')
    _validate_fmd(cfg)
    _validate_fast_paths(cfg, origins or {})
    return cfg


def _refuse(name: str, value: Any, option: str, reason: str, origins: Mapping[str, str], fix: str = '') -> None:
    origin = f' ({origins[name]})' if name in origins else ''
    raise ValueError(f'{_opt(name)}: got {value!r}{origin}, which {option} does not support ({reason})'
                     + (f'; pass {fix}' if fix else ''))


def _validate_fast_paths(cfg: TrainConfig, origins: Mapping[str, str]) -> None:
    """Options that ``--data-on-device`` / ``--cuda-graph`` have no implementation of, refused by name."""
    if cfg.data_on_device and not cfg.no_aug:
        unsupported = (('aa', cfg.aa is not None, 'no batched AutoAugment / RandAugment on the device', '--aa none'),
                       ('reprob', cfg.reprob > 0, 'no batched random erasing on the device', '--reprob 0'),
                       ('color_jitter', cfg.color_jitter > 0, 'no batched colour jitter on the device',
                        '--color-jitter 0'),
                       ('train_crop_mode', cfg.train_crop_mode != 'pad',
                        'images are stored at the input size: only the pad crop mode', '--train-crop-mode pad'))
        for name, active, reason, fix in unsupported:
            if active:
                _refuse(name, getattr(cfg, name), '--data-on-device', reason, origins, fix)
    if cfg.data_on_device and cfg.skip_corrupt:
        _refuse('skip_corrupt', True, '--data-on-device', 'every image is decoded up front: fix or remove '
                                                         'unreadable files, or train without --data-on-device', origins)
    if cfg.cuda_graph:
        if cfg.grad_accum_steps != 1:
            _refuse('grad_accum_steps', cfg.grad_accum_steps, '--cuda-graph', 'one captured step is one optimiser step',
                    origins, '--grad-accum-steps 1')
        if cfg.amp and cfg.amp_dtype == 'float16':
            _refuse('amp_dtype', cfg.amp_dtype, '--cuda-graph', 'the fp16 grad scaler reads its inf check on the host',
                    origins, '--amp-dtype bfloat16')
        if cfg.skip_corrupt:
            _refuse('skip_corrupt', True, '--cuda-graph', 'a skipped image changes the batch shape the graph '
                                                          'was captured with', origins)


def _validate_fmd(cfg: TrainConfig) -> None:
    if cfg.fmd_prob is not None:
        _check(0.0 <= cfg.fmd_prob < 1.0, 'fmd_prob', cfg.fmd_prob, 'a probability in [0, 1)')
    if cfg.fmd_block_size is not None:
        _check(cfg.fmd_block_size >= 0, 'fmd_block_size', cfg.fmd_block_size, 'an integer >= 0 (0 = element-wise)')
    if cfg.fmd_sites is not None:
        _check(bool(cfg.fmd_sites) and set(cfg.fmd_sites) <= set(FMD_SITES), 'fmd_sites', cfg.fmd_sites,
               f'a non-empty subset of {list(FMD_SITES)}')
    if cfg.fmd_stages is not None:
        _check(bool(cfg.fmd_stages), 'fmd_stages', cfg.fmd_stages, 'at least one stage index')
    if cfg.fmd_stage_scale is not None:
        stages = cfg.fmd_stages or list(FMD_DEFAULTS.stages)
        _check(len(cfg.fmd_stage_scale) == len(stages), 'fmd_stage_scale', cfg.fmd_stage_scale,
               f'one multiplier per --fmd-stages entry ({stages})')
        _check(all(s >= 0 for s in cfg.fmd_stage_scale), 'fmd_stage_scale', cfg.fmd_stage_scale, 'multipliers >= 0')
    for name in ('fmd_gamma', 'fmd_lam'):
        value = getattr(cfg, name)
        if value is not None:
            _check(value >= 0, name, value, 'a number >= 0')
    if cfg.fmd_steps is not None:
        _check(cfg.fmd_steps >= 1, 'fmd_steps', cfg.fmd_steps, 'an integer >= 1')


# ------------------------------------------------------------------------------------- command line
_GROUPS = {'data_dir': 'data', 'model': 'model', 'img_size': 'input and augmentation', 'epochs': 'optimisation',
           'amp': 'precision, speed, EMA', 'fmd_prob': 'Feature Map Distortion (fmd_<arch> models)', 'output': 'run'}


def _text(value: Any) -> str:
    """A setting as it is typed on the command line."""
    if value is None:
        return 'none'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ' '.join(map(_text, value)) if value else 'none'
    if isinstance(value, dict):
        return ' '.join(f'{k}={v}' for k, v in value.items()) if value else 'none'
    return str(value)


def _shown_default(name: str, value: Any) -> str:
    if value is None and name.startswith('fmd_'):  # one set of FMD defaults: the registry's
        registry = 'no ramp' if name == 'fmd_ramp_epochs' else _text(getattr(FMD_DEFAULTS, name[4:]))
        return f"none = the registry's: {registry}"
    return _text(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one option per :class:`TrainConfig` field (values stay raw strings until
    :func:`config_from_args` coerces them, so YAML and command line share one conversion)."""
    parser.add_argument('-c', '--config', help='YAML recipe (e.g. configs/cifar10_resnet56_bfmd.yaml); command-line '
                                               'options override it, it overrides the defaults. With neither '
                                               '--config nor --data-dir: the embedded digits recipe '
                                               '(configs/digits.yaml), whose values replace the defaults shown '
                                               'below')
    group = parser
    defaults = TrainConfig()
    for name, f in _FIELDS.items():
        if name in _GROUPS:
            group = parser.add_argument_group(_GROUPS[name])
        tp, meta = _TYPES[name], f.metadata
        help = f"{meta['help']} (default: {_shown_default(name, getattr(defaults, name))})".replace('%', '%%')
        kwargs: Dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help)
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is Union else [tp]
        kind = typing.get_origin(inner[0]) if len(inner) == 1 else None
        if inner == [bool] and name.startswith('no_'):  # --no-aug and --aug, not --no-aug / --no-no-aug
            group.add_argument(_opt(name), action='store_const', const='true', **kwargs)
            group.add_argument(_opt(name[3:]), dest=name, action='store_const', const='false',
                               default=argparse.SUPPRESS, help=f'undo a recipe\'s {_opt(name)}')
            continue
        if inner == [bool]:
            kwargs['action'] = argparse.BooleanOptionalAction
        elif 'const' in meta:
            kwargs.update(nargs='?', const=meta['const'])
        elif kind in (list, List):
            kwargs.update(nargs='+')
        elif kind in (dict, Dict):
            kwargs.update(nargs='*', metavar='K=V')
        if 'choices' in meta:
            kwargs['choices'] = meta['choices']
        group.add_argument(*meta.get('flags', (_opt(name),)), **kwargs)


def _check_recipe_sources(cfg: TrainConfig, origins: Mapping[str, str], recipe: str, command: str,
                          published: bool) -> None:
    """A recipe's data folder and weights file must exist here: a published ``train_config.yaml`` names the data
    set and "a local weights file" instead of this machine's paths, so it needs ``--data-dir`` (``--pretrained``)."""
    if 'data_dir' in origins and cfg.data_dir is not None and not Path(cfg.data_dir).expanduser().exists():
        raise FileNotFoundError(f'--data-dir: {recipe} sets data_dir {cfg.data_dir!r}, which does not exist here'
                                + (' (a published train_config.yaml names the data set, not a local path)' if published
                                   else '') + f'; give your copy of the data: `{command} --data-dir YOUR_COPY`')
    source = cfg.pretrained
    if 'pretrained' in origins and isinstance(source, str) and not source.startswith('hf-hub:') and \
            not Path(source).expanduser().is_file() and not split_model_name_tag(source)[1]:
        raise FileNotFoundError(f'--pretrained: {recipe} sets pretrained {source!r}, which is not a weights file here, '
                                f'an hf-hub:org/repo source or a timm arch.tag'
                                + (' (a published train_config.yaml does not name local files)' if published else '')
                                + f'; give the weights: `{command} --pretrained PATH`, or start from scratch: '
                                  f'--pretrained false')


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then a recipe, then the options given on the command line; validated.

    The recipe is ``--config``'s YAML; with ``--resume RUN_DIR`` the run's ``config.yaml``; with none of
    ``--config``, ``--resume`` and ``--data-dir`` the embedded digits recipe (:data:`DIGITS_RECIPE`).
    """
    given = {k: v for k, v in vars(args).items() if k in _FIELDS}
    given = {k: 'none' if v == ['none'] else v for k, v in given.items()}
    if given.get('resume'):
        if args.config:
            raise ValueError(f'--config: not with --resume (the run directory\'s config.yaml is the base); continue '
                             f'the run with `timm-fmd train --resume {given["resume"]}`')
        run_config = Path(given['resume']) / 'config.yaml'
        if not run_config.is_file():
            raise FileNotFoundError(f'--resume: {given["resume"]} has no config.yaml, so it is not a run directory '
                                    f'(timm-fmd train writes one when a run starts)')
        base, recipe, command = load_yaml(run_config), str(run_config), f'timm-fmd train --resume {given["resume"]}'
    elif args.config:
        base, recipe, command = load_yaml(args.config), args.config, f'timm-fmd train -c {args.config}'
    else:
        base = {} if 'data_dir' in given else load_yaml(DIGITS_RECIPE)
        recipe, command = 'the embedded digits recipe', 'timm-fmd train'
    origins = {k: f'set by {recipe}' if k in base else 'the default' for k in _FIELDS if k not in given}
    cfg = validate(merge(merge(TrainConfig(), base), given), origins)
    published = bool(args.config) and Path(args.config).name == 'train_config.yaml'  # the name publish gives it
    _check_recipe_sources(cfg, origins, recipe, command, published)
    explicit_fmd = sorted(k for k in given if k.startswith('fmd_'))
    if explicit_fmd and not cfg.model.startswith('fmd_'):
        fix = (f'--model fmd_<its architecture> --pretrained {cfg.model}' if cfg.model.startswith('hf-hub:')
               else f'--model fmd_{cfg.model}')
        raise ValueError(f'{_opt(explicit_fmd[0])}: Feature Map Distortion needs an fmd_<arch> model, got --model '
                         f'{cfg.model} (use {fix})')
    return cfg
