"""Checkpoints: atomic files, safetensors weights plus a plain-data state file, RNG capture.

A checkpoint ``<name>`` is two files in ``RUN_DIR/checkpoints/``: ``<name>.safetensors`` (the
weights that were evaluated, metadata per the run directory contract) and ``<name>.state.pt``
(``torch.save`` of a dict of tensors, numbers, strings, lists and dicts only, so
``torch.load(weights_only=True)`` reads it and nothing is ever unpickled).

Both are written to ``*.tmp`` files and flushed before either is renamed into place, weights first.
A crash between the two renames leaves new weights beside the old state *and* the complete new
state in ``<name>.state.pt.tmp``; :func:`load_checkpoint` detects the mismatch (the pair carries
``epoch`` and ``global_step`` on both sides) and finishes the rename.
"""
from __future__ import annotations

import hashlib
import os
import random
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

__all__ = ['atomic_path', 'atomic_write', 'weights_for_saving', 'save_weights', 'load_weights', 'save_checkpoint',
           'load_checkpoint', 'capture_rng', 'restore_rng']

PathLike = Union[str, os.PathLike]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success flush it and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ------------------------------------------------------------------------------------------- weights
def weights_for_saving(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """``module.state_dict()`` on the CPU, contiguous, with no two tensors sharing storage (safetensors)."""
    out, seen = {}, set()
    for key, value in module.state_dict().items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            value = value.clone()
        seen.add(ptr)
        out[key] = value
    return out


def save_weights(path: PathLike, weights: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    """Write a safetensors file atomically (metadata values must be strings)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(save(weights, metadata=metadata))  # plain open(): file mode follows the umask


def load_weights(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """``(state_dict, metadata)`` of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    with safe_open(str(path), framework='pt') as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata


# ------------------------------------------------------------------------------------ checkpoint pair
def _pair(directory: Path, name: str) -> Tuple[Path, Path]:
    return directory / f'{name}.safetensors', directory / f'{name}.state.pt'


def _load_state(path: Path) -> Dict[str, Any]:
    return torch.load(path, map_location='cpu', weights_only=True)


def _marker(state_or_meta: Dict[str, Any]) -> Tuple[int, int]:
    return int(state_or_meta['epoch']), int(state_or_meta['global_step'])


def save_checkpoint(directory: PathLike, name: str, weights: Dict[str, torch.Tensor], metadata: Dict[str, str],
                    state: Dict[str, Any]) -> None:
    """Write ``<name>.safetensors`` and ``<name>.state.pt`` as one recoverable unit (see module doc)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if _marker(metadata) != _marker(state):
        raise ValueError(f'metadata {metadata} and state disagree on epoch/global_step')
    weights_path, state_path = _pair(directory, name)
    weights_tmp, state_tmp = Path(f'{weights_path}.tmp'), Path(f'{state_path}.tmp')
    weights_tmp.write_bytes(save(weights, metadata=metadata))
    torch.save(state, state_tmp)
    _fsync(weights_tmp)
    _fsync(state_tmp)
    os.replace(weights_tmp, weights_path)
    os.replace(state_tmp, state_path)


def load_checkpoint(directory: PathLike, name: str = 'last') -> Tuple[Dict[str, torch.Tensor], Dict[str, str],
                                                                          Dict[str, Any]]:
    """``(weights, metadata, state)`` of checkpoint ``name``, completing an interrupted save if needed."""
    directory = Path(directory)
    weights_path, state_path = _pair(directory, name)
    if not state_path.is_file():
        raise FileNotFoundError(f'no checkpoint to resume from: {state_path} does not exist')
    weights, metadata = load_weights(weights_path)
    state = _load_state(state_path)
    if _marker(metadata) != _marker(state):
        state_tmp = Path(f'{state_path}.tmp')
        pending: Optional[Dict[str, Any]] = _load_state(state_tmp) if state_tmp.is_file() else None
        if pending is None or _marker(pending) != _marker(metadata):
            raise RuntimeError(f'checkpoint {weights_path} (epoch, step {_marker(metadata)}) does not match '
                               f'{state_path} ({_marker(state)}) and no matching pending state exists')
        os.replace(state_tmp, state_path)
        state = pending
    return weights, metadata, state


# ----------------------------------------------------------------------------------------------- RNG
def capture_rng(device: torch.device = torch.device('cpu')) -> Dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU) as plain data, and on a CUDA ``device`` that
    device's generator (the FMD masks' stream); ``cuda`` is ``None`` on the CPU.

    Only the run's own device is captured (``device`` must carry an index, e.g. ``cuda:1``): every
    rank saves its own GPU's stream, and resuming restores it onto whichever device the rank has then.
    """
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        'python': [version, list(mt), gauss],
        'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        'torch': torch.get_rng_state(),
        'cuda': _cuda_generator(device).get_state() if device.type == 'cuda' else None,
    }


def restore_rng(state: Dict[str, Any], device: torch.device = torch.device('cpu')) -> None:
    """Inverse of :func:`capture_rng`, onto ``device`` (the index may differ from the captured one).

    A state captured on the CPU (no CUDA stream) resumed on CUDA seeds that device's generator from
    the restored CPU state, so it stays deterministic and distinct per rank (no longer bit-exact: the
    masks come from another device's stream anyway).
    """
    version, mt, gauss = state['python']
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if device.type != 'cuda':
        return
    generator, cuda = _cuda_generator(device), state.get('cuda')
    if isinstance(cuda, torch.Tensor):
        generator.set_state(cuda)
    else:  # captured on the CPU: None (older checkpoints: an empty list)
        generator.manual_seed(int.from_bytes(hashlib.sha256(state['torch'].numpy().tobytes()).digest()[:8], 'little'))


def _cuda_generator(device: torch.device) -> torch.Generator:
    """The default generator of CUDA ``device``: what ``torch.cuda.get_rng_state(device)`` reads."""
    if device.index is None:
        raise ValueError(f'device: a CUDA generator needs an indexed device such as cuda:0, got {device}')
    torch.cuda.init()
    return torch.cuda.default_generators[device.index]
