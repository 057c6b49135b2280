"""The ``timm-fmd`` command line: ``timm-fmd <command> [options]``.

Each command is one function taking the parsed arguments and returning an exit status, declared
with :func:`command` together with its options. Adding a command is adding one such function::

    @command('describe', 'show where FMD sits in a model',
             arg('model', help='timm model name'), arg('--fmd-stages', type=int, nargs='+'))
    def describe(args: argparse.Namespace) -> int:
        ...
        return 0

User errors (``ValueError``, ``FileNotFoundError``, a diverged loss's ``FloatingPointError``) print one line and
exit with status 2; Ctrl-C prints one line (for ``train``: how to continue) and exits with status 130.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

__all__ = ['main', 'build_parser', 'command', 'arg']

ArgSpec = Union[Tuple[tuple, dict], Callable[[argparse.ArgumentParser], None]]
_COMMANDS: List[Tuple[str, str, Sequence[ArgSpec], Callable[[argparse.Namespace], int]]] = []


def arg(*flags: str, **kwargs: Any) -> Tuple[tuple, dict]:
    """One ``parser.add_argument(*flags, **kwargs)`` for :func:`command`."""
    return flags, kwargs


def command(name: str, help: str, *args: ArgSpec) -> Callable:
    """Register the decorated ``fn(args) -> int`` as ``timm-fmd <name>`` with options ``args``
    (:func:`arg` tuples, or functions that add options to the sub-parser)."""
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        _COMMANDS.append((name, help, args, fn))
        return fn
    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-fmd', description='Feature Map Distortion (Tang et al., AAAI 2020) '
                                                                  'for timm models')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, help, specs, fn in _COMMANDS:
        sub = subparsers.add_parser(name, help=help, description=help)
        for spec in specs:
            if callable(spec):
                spec(sub)
            else:
                sub.add_argument(*spec[0], **spec[1])
        sub.set_defaults(run=fn)
    return parser


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    from .train.config import add_arguments
    add_arguments(parser)


@command('train', 'train a timm model, with FMD for fmd_<arch> models (no options: the embedded digits recipe)',
         _add_train_options)
def train(args: argparse.Namespace) -> int:
    from .train import fit
    from .train.config import config_from_args
    fit(config_from_args(args))  # ends by printing the best accuracy and the run directory
    return 0


@command('eval', 'evaluate a saved checkpoint on its run\'s validation (or training) split',
         arg('--checkpoint', required=True, help='RUN_DIR (its checkpoints/best.safetensors) or '
                                               'RUN_DIR/checkpoints/<best|last>.safetensors'),
         arg('--data-dir', help='the data (default: the data the run was trained on)'),
         arg('-b', '--batch-size', type=int, help='batch size (default: the run\'s validation batch size)'),
         arg('-j', '--workers', type=int, help='data loader workers (default: the run\'s)'),
         arg('--device', help='auto, cpu, cuda or cuda:N (default: the run\'s)'),
         arg('--split', choices=('val', 'train'), default='val',
             help='val (default), or the run\'s training samples without augmentation (how well it fits them)'))
def evaluate(args: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint
    results = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, batch_size=args.batch_size,
                                  workers=args.workers, device=args.device, split=args.split)
    print(json.dumps(results, indent=2))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f'timm-fmd {args.command}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line (train's says how to go on), the shell's status for SIGINT
        print(f'timm-fmd {args.command}: {str(e) or "interrupted"}', file=sys.stderr)
        return 130


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('model', help='timm model name: fmd_<arch>, or any arch with --fmd-* options')
    parser.add_argument('--num-classes', type=int, help='classifier size (default: the model\'s)')
    parser.add_argument('--input-size', type=int, nargs=3, metavar=('C', 'H', 'W'),
                        help='input size the feature shapes are shown at (default: the model\'s)')
    # the registry's fmd_* keyword arguments; unset ones keep FMDSettings' defaults, shown in the help
    from .inject import FMDSettings
    defaults = FMDSettings()
    for flag, help, kwargs in (
            ('--fmd-prob', 'target distortion probability', dict(type=float)),
            ('--fmd-block-size', 'block size of block FMD; 0 = element-wise', dict(type=int)),
            ('--fmd-stages', 'feature_info stage indices', dict(type=int, nargs='+')),
            ('--fmd-sites', 'site kinds', dict(nargs='+', choices=('conv', 'skip'))),
            ('--fmd-gamma', 'step length gamma', dict(type=float)),
            ('--fmd-lam', 'weight lambda of the ||eps||^2 term', dict(type=float)),
            ('--fmd-steps', 'distortion steps per forward', dict(type=int)),
            ('--fmd-mode', 'distortion solver', dict(choices=('approx', 'exact'))),
            ('--fmd-shared-mask', 'one mask for all channels', dict(action='store_true', default=None)),
            ('--fmd-stage-scale', 'probability multiplier per stage', dict(type=float, nargs='+')),
            ('--fmd-ramp-steps', 'linear ramp length in optimiser steps', dict(type=int))):
        default = getattr(defaults, flag[6:].replace('-', '_'))
        parser.add_argument(flag, help=f'{help} (default: {default})', **kwargs)


@command('describe', 'show every FMD site of a model: module, kind, shape, probability, block, next layer',
         _add_model_options)
def describe(args: argparse.Namespace) -> int:
    from . import create_model, describe as site_table, fmd_ops
    kwargs = {k: v for k, v in vars(args).items() if k.startswith('fmd_') and v is not None}
    if args.input_size and (kwargs or args.model.startswith('fmd_')):  # probe at that size; FMD stays off otherwise
        kwargs['fmd_input_size'] = tuple(args.input_size)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    model = create_model(args.model, **kwargs)
    print(site_table(model, input_size=tuple(args.input_size) if args.input_size else None))
    if not fmd_ops(model):
        print(_how_to_see_sites(args.model))
    return 0


def _how_to_see_sites(model_name: str) -> str:
    """For a model built without FMD: the name (or option) that shows its sites. A plain name means no FMD, in
    describe as in train and create_model; its fmd_ twin or any --fmd-* option turns FMD on at the defaults."""
    from timm.models import is_model, parse_model_name, split_model_name_tag
    from .registry import PREFIX
    source, model_id = parse_model_name(model_name)
    arch = split_model_name_tag(model_id)[0]
    if source is None and not arch.startswith(PREFIX) and is_model(PREFIX + arch):
        return (f"{model_name} is a plain timm name: `timm-fmd describe {PREFIX}{model_id}` (or any --fmd-* option) "
                f"shows where FMD goes, with the registry's defaults for the options left unset")
    return "any --fmd-* option shows where FMD goes, with the registry's defaults for the options left unset"


@command('publish', 'publish a run to the Hugging Face Hub as a timm model (--out-dir: write the folder only)',
         arg('source', help='RUN_DIR or RUN_DIR/checkpoints/<name>.safetensors'),
         arg('--repo-id', help='ORG/NAME (required unless --out-dir)'),
         arg('--out-dir', help='dry run: write the repository folder here and push nothing'),
         arg('--private', action='store_true', help='create the repository private'),
         arg('--revision', help='branch to commit to (created if missing)'),
         arg('--commit-message', help='commit message'),
         arg('--baseline', help='baseline RUN_DIR whose results are shown beside this run\'s in the card'),
         arg('--license', default='apache-2.0', help='licence of the weights in the card'),
         arg('--dataset', help='the Hugging Face Hub id of the data set (e.g. uoft-cs/cifar10, checked against the '
                               'Hub when pushing): listed in the card\'s metadata and naming the data in the '
                               'published files. Default: no data set in the metadata, the data named "a local '
                               'image folder" (or "digits", the embedded set); local paths are never published'),
         arg('--allow', action='append', default=[], metavar='TEXT',
             help='a string the leak check may publish after all, e.g. a class name equal to your user name '
                  '(repeatable)'),
         arg('--overwrite', action='store_true', help='replace a non-empty --out-dir (without it only the source itself '
                                                      'is replaced: a published FOLDER rendered again in place)'))
def publish(args: argparse.Namespace) -> int:
    # The token comes from HF_TOKEN or the login cache only: no --token flag to leak into `ps` output.
    from .hub import PublishError, publish as publish_run
    try:
        print(publish_run(args.source, args.repo_id, out_dir=args.out_dir, private=args.private,
                          revision=args.revision, commit_message=args.commit_message, baseline=args.baseline,
                          license=args.license, dataset=args.dataset, overwrite=args.overwrite,
                          allow=args.allow))
    except (PublishError, FileExistsError) as e:
        print(f'timm-fmd publish: error: {e}', file=sys.stderr)
        return 1
    return 0


@command('erc', 'estimate the empirical Rademacher complexity of a saved run\'s layers on its validation split',
         arg('--checkpoint', required=True, help='RUN_DIR (its checkpoints/best.safetensors) or '
                                               'RUN_DIR/checkpoints/<best|last>.safetensors'),
         arg('--data-dir', help='the data (default: the data the run was trained on)'),
         arg('--layers', nargs='+', help='module paths (default: the layers after the FMD sites)'),
         arg('--batches', type=int, default=8, help='validation batches to average over'),
         arg('--draws', type=int, default=256, help='Rademacher sign vectors per batch'),
         arg('-b', '--batch-size', type=int, help='batch size (the ERC scales as 1/batch size)'),
         arg('--device', help='auto, cpu, cuda or cuda:N (default: the run\'s)'))
def erc(args: argparse.Namespace) -> int:
    from .train.rademacher import erc_checkpoint
    result = erc_checkpoint(args.checkpoint, data_dir=args.data_dir, layers=args.layers, max_batches=args.batches,
                            draws=args.draws, batch_size=args.batch_size, device=args.device)
    width = max(len(p) for p in result['erc'])
    print(f"ERC at batch size {result['batch_size']} ({result['batches']} batches x {result['draws']} draws)")
    for path, v in result['erc'].items():
        print(f"{path:<{width}}  {v['mean']:.6g} +- {v['se']:.2g}")
    return 0
