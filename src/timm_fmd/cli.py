"""The ``timm-fmd`` command line: ``timm-fmd <command> [options]``.

Each command is one function taking the parsed arguments and returning an exit status, declared
with :func:`command` together with its options. Adding a command is adding one such function::

    @command('describe', 'show where FMD sits in a model',
             arg('model', help='timm model name'), arg('--fmd-stages', type=int, nargs='+'))
    def describe(args: argparse.Namespace) -> int:
        ...
        return 0

User errors (``ValueError``, ``FileNotFoundError``) print one line and exit with status 2.
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
    results = fit(config_from_args(args))
    best = results['best'] or {}
    print(f"best val top-1 {best.get('val_top1')} at epoch {best.get('epoch')}; run directory written")
    return 0


@command('eval', 'evaluate a saved checkpoint on its run\'s validation split',
         arg('--checkpoint', required=True, help='RUN_DIR/checkpoints/<best|last>.safetensors'),
         arg('--data-dir', help='the data (default: the data the run was trained on)'),
         arg('-b', '--batch-size', type=int, help='batch size (default: the run\'s validation batch size)'),
         arg('-j', '--workers', type=int, help='data loader workers (default: the run\'s)'),
         arg('--device', help='auto, cpu, cuda or cuda:N (default: the run\'s)'))
def evaluate(args: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint
    results = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, batch_size=args.batch_size,
                                  workers=args.workers, device=args.device)
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
    except (ValueError, FileNotFoundError) as e:
        print(f'timm-fmd {args.command}: error: {e}', file=sys.stderr)
        return 2
