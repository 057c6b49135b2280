"""Fixtures for the Hub tests: a local Hub server the real ``huggingface_hub`` client talks to, and run dirs.

Pointing the client at the server. huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_DISABLE_XET, ... into
module constants when it is first imported (``huggingface_hub.constants``; ``import timm`` already does it),
copies some of them into other modules (``from ..constants import X``), derives values from them
(``utils._http._HUB_ORIGINS``) and builds a module-level ``HfApi`` whose ``endpoint`` is frozen at import; the
module functions ``create_repo``, ``model_info``, ``upload_folder``, ... are methods bound to it. Other test
modules import timm long before this conftest runs and the server's port is only known once it listens, so
setting the environment early cannot work. Instead ``point_client_at`` sets the environment (for subprocesses
and for what the client reads at call time, such as HF_TOKEN), re-evaluates ``constants.py`` under it, and
monkeypatches every constant that changed, in ``constants`` and wherever an already-imported huggingface_hub
module holds a copy under the same name, plus ``_HUB_ORIGINS`` and the ``endpoint`` of every module-level
``HfApi``. It then drops the cached HTTP client so that the next one is built under the new environment.
``test_client_points_at_local_server`` checks the result through the module-level functions timm uses.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
import yaml
from safetensors.torch import save_file

from .hub_server import TOKEN, HubServer

_CLIENT_ENV = {
    'HF_HUB_DISABLE_XET': '1',  # the server speaks LFS basic transfer, not Xet
    'HF_HUB_OFFLINE': '0',
    'HF_HUB_DISABLE_TELEMETRY': '1',
    'HF_HUB_DISABLE_PROGRESS_BARS': '1',
    'HF_HUB_DISABLE_IMPLICIT_TOKEN': '0',
    'NO_PROXY': '127.0.0.1',
    'no_proxy': '127.0.0.1',
}
# Variables that would override what HF_HOME/HF_ENDPOINT/HF_TOKEN decide.
_CLEARED_ENV = ('HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE', 'HF_ASSETS_CACHE', 'HUGGINGFACE_ASSETS_CACHE', 'HF_XET_CACHE',
                'HF_TOKEN_PATH', 'HUGGING_FACE_HUB_TOKEN', 'HUGGINGFACE_CO_STAGING', 'HF_OIDC_RESOURCE',
                'TRANSFORMERS_OFFLINE', 'XDG_CACHE_HOME')


def point_client_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, hf_home: Path, token: str | None) -> None:
    """Make the already-imported huggingface_hub client use ``endpoint``, ``hf_home`` and ``token``."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    for name in _CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**_CLIENT_ENV, 'HF_ENDPOINT': endpoint, 'HF_HOME': str(hf_home)}.items():
        monkeypatch.setenv(name, value)
    if token is None:
        monkeypatch.delenv('HF_TOKEN', raising=False)
    else:
        monkeypatch.setenv('HF_TOKEN', token)

    spec = importlib.util.find_spec('huggingface_hub.constants')
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    client_modules = [m for n, m in list(sys.modules.items()) if n.startswith('huggingface_hub') and m is not None]
    for name, value in vars(fresh).items():
        old = getattr(constants, name, None)
        if not name.isupper() or name.startswith('_') or old == value:
            continue
        for module in client_modules:
            if vars(module).get(name, value) == old:
                monkeypatch.setattr(module, name, value)
    origins = (constants._HF_DEFAULT_ENDPOINT, constants._HF_DEFAULT_STAGING_ENDPOINT, endpoint, 'https://hf.co')
    if hasattr(_http, '_HUB_ORIGINS'):  # huggingface_hub >= 2.2 sends the token to these origins only
        monkeypatch.setattr(_http, '_HUB_ORIGINS', frozenset(_http._url_origin(e) for e in origins))
    for module in client_modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, huggingface_hub.HfApi):
                monkeypatch.setattr(value, 'endpoint', endpoint)
    huggingface_hub.close_session()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A fresh local Hub; the client points at it with a valid token in HF_TOKEN and an empty HF_HOME."""
    import huggingface_hub

    server = HubServer(tmp_path / 'hub-storage').start()
    point_client_at(monkeypatch, server.url, tmp_path / 'hf-home', TOKEN)
    yield server
    huggingface_hub.close_session()
    server.stop()
    assert server.unhandled == [], f'the local Hub met requests it does not implement: {server.unhandled}'


# ----- run directories following /tmp/team/RUN_DIR_CONTRACT.md -----

ARCH = 'test_resnet'  # a 0.37 M parameter timm ResNet, fast enough to build, count and ship in every test
LABELS = ['cat', 'dog', 'frog']
FMD = {'prob': 0.1, 'block_size': 3, 'stages': [-2, -1], 'sites': ['conv', 'skip'], 'gamma': 1.0, 'lam': 1.0,
       'steps': 1, 'mode': 'approx', 'shared_mask': False, 'stage_scale': None, 'ramp_steps': 40}
METRICS_HEADER = ['epoch', 'step', 'lr', 'fmd_prob', 'train_loss', 'train_top1', 'train_top5', 'val_loss', 'val_top1',
                  'val_top5', 'images_per_sec', 'epoch_time_s']


def _random_weights(arch: str, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """A state dict no fresh initialisation reproduces: random weights and random BN statistics."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=num_classes)
    return {k: (torch.randn_like(v) if v.is_floating_point() else v + 3) for k, v in model.state_dict().items()}


def make_run_dir(path: Path, *, fmd: dict | None = FMD, seed: int = 0, evaluated: bool = True,
                 epochs: int = 3) -> Path:
    """Write a finished (tiny) training run into ``path`` exactly as the trainer's contract describes it."""
    path.mkdir(parents=True)
    (path / 'checkpoints').mkdir()
    model_name = f'fmd_{ARCH}' if fmd else ARCH
    best_epoch = epochs - 1
    rows = []
    for epoch in range(epochs):
        train_top1, val_top1 = 40.0 + 10 * epoch + seed, 35.0 + 8 * epoch + seed
        rows.append({'epoch': epoch, 'step': 20 * (epoch + 1), 'lr': 0.1 / (epoch + 1),
                     'fmd_prob': min(1.0, 20 * (epoch + 1) / fmd['ramp_steps']) * fmd['prob'] if fmd else '',
                     'train_loss': 1.5 - 0.2 * epoch, 'train_top1': train_top1, 'train_top5': 100.0,
                     'val_loss': 1.6 - 0.15 * epoch if evaluated else '', 'val_top1': val_top1 if evaluated else '',
                     'val_top5': 100.0 if evaluated else '', 'images_per_sec': 900.0 + epoch,
                     'epoch_time_s': 1.5})
    with open(path / 'metrics.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, METRICS_HEADER)
        writer.writeheader()
        writer.writerows(rows)
    weights = {'best': _random_weights(ARCH, len(LABELS), seed), 'last': _random_weights(ARCH, len(LABELS), seed + 1)}
    for name, state_dict in weights.items():
        metadata = {'architecture': ARCH, 'model': model_name, 'format': 'pt',
                    'epoch': str(best_epoch if name == 'best' else epochs - 1), 'global_step': str(20 * epochs)}
        save_file(state_dict, str(path / 'checkpoints' / f'{name}.safetensors'), metadata=metadata)
    config = {'model': model_name, 'epochs': epochs, 'batch_size': 16, 'lr': 0.1, 'opt': 'sgd', 'momentum': 0.9,
              'weight_decay': 5e-4, 'sched': 'cosine', 'seed': seed, 'data': 'digits',
              **{f'fmd_{k}': v for k, v in (fmd or {}).items()}}
    (path / 'config.yaml').write_text(yaml.safe_dump(config, sort_keys=False))
    last = rows[-1]
    best = ({'epoch': best_epoch, 'val_top1': rows[best_epoch]['val_top1'], 'val_top5': 100.0,
             'val_loss': rows[best_epoch]['val_loss']} if evaluated else None)
    results = {
        'model': model_name, 'architecture': ARCH, 'pretrained': None, 'num_classes': len(LABELS),
        'label_names': LABELS, 'model_kwargs': {}, 'fmd': fmd,
        'data': {'name': 'digits', 'train_size': 320, 'val_size': 80, 'val_split': 'carved', 'carve_seed': 0,
                 'input_size': [3, 32, 32], 'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25],
                 'interpolation': 'bilinear', 'crop_pct': 1.0},
        'epochs': epochs, 'global_steps': 20 * epochs, 'batch_size': 16, 'seed': seed, 'best': best,
        'final': {'epoch': epochs - 1, 'train_loss': last['train_loss'], 'train_top1': last['train_top1'],
                  'val_loss': last['val_loss'] or None, 'val_top1': last['val_top1'] or None,
                  'val_top5': last['val_top5'] or None},
        'train_val_gap': last['train_top1'] - last['val_top1'] if evaluated else None,
        'evaluated_weights': 'model', 'param_count': sum(v.numel() for k, v in weights['best'].items()
                                                          if not k.endswith(('running_mean', 'running_var',
                                                                             'num_batches_tracked'))),
        'wall_time_s': 4.5, 'images_per_sec': 901.0,
        'checkpoint': 'checkpoints/best.safetensors' if evaluated else 'checkpoints/last.safetensors',
        'versions': {'torch': torch.__version__, 'timm': '1.0.31', 'timm_fmd': '0.1.0'},
    }
    (path / 'results.json').write_text(json.dumps(results, indent=2))
    _plot_curves(rows, path / 'curves.png')
    return path


def _plot_curves(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([r['epoch'] for r in rows], [r['train_top1'] for r in rows], label='train')
    fig.savefig(out)
    plt.close(fig)


def make_image_folder(root: Path, per_split: dict) -> Path:
    """``root/<split>/<class>/NNN.png``: 16x16 images of three flat colours (classes circle, square, stripes)."""
    from PIL import Image
    for split, n in per_split.items():
        for c, colour in (('circle', (200, 30, 30)), ('square', (30, 200, 30)), ('stripes', (30, 30, 200))):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new('RGB', (16, 16), tuple(v + 5 * i for v in colour)).save(root / split / c / f'{i:03d}.png')
    return root


@pytest.fixture
def make_run(tmp_path: Path) -> Callable[..., Path]:
    """``make_run(name='run', **kwargs)``: a contract-conforming RUN_DIR under ``tmp_path / 'runs'``."""
    def factory(name: str = 'run', **kwargs) -> Path:
        return make_run_dir(tmp_path / 'runs' / name, **kwargs)
    return factory
