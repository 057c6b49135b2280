"""Shared fixtures of the trainer tests: tiny ImageFolder data sets, a private cache, quick configs."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from timm_fmd.train import TrainConfig

# One thread for the whole session (module-scoped fixtures too): CPU results are bit-reproducible only
# at a fixed thread count, and the machine is shared.
torch.set_num_threads(1)


def make_image_folder(root: Path, per_class: dict, classes=('circle', 'square', 'stripes'), size: int = 16,
                      seed: int = 0) -> Path:
    """``root/<split>/<class>/NNN.png`` with ``per_class[split]`` images a class: a learnable pattern
    per class plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    patterns = {
        'circle': ((xx - .5) ** 2 + (yy - .5) ** 2 < .1).astype(float),
        'square': ((abs(xx - .5) < .3) & (abs(yy - .5) < .3)).astype(float) * .7,
        'stripes': (np.sin(xx * 20) > 0).astype(float),
    }
    for split, n in per_class.items():
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = patterns[c][..., None] * rng.uniform(.5, 1, 3) + rng.normal(0, .15, (size, size, 3))
                Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f'{i:03d}.png')
    return root


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp('timm_fmd_cache')


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, cache_dir):
    monkeypatch.setenv('TIMM_FMD_CACHE', str(cache_dir))
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> Path:
    """3 classes x (16 train, 4 val) images of 16x16."""
    return make_image_folder(tmp_path_factory.mktemp('tiny'), {'train': 16, 'val': 4})


@pytest.fixture(scope='session')
def small_data(tmp_path_factory) -> Path:
    """3 classes x (64 train, 8 val) images of 16x16."""
    return make_image_folder(tmp_path_factory.mktemp('small'), {'train': 64, 'val': 8}, seed=1)


def quick_config(data: Path, output: Path, **overrides) -> TrainConfig:
    """A config that trains a tiny timm model on 16x16 images in about a second."""
    values = dict(data_dir=str(data), model='test_efficientnet', img_size=16, batch_size=8, epochs=1, workers=0,
                  output=str(output), experiment='run', log_interval=1000, checkpoint_interval=0, warmup_epochs=0,
                  sched='step', decay_epochs=1.0, decay_rate=0.5, lr=0.05, rotate=0.0)
    values.update(overrides)
    return TrainConfig(**values)


class FakeCuda:
    """Stands in for ``torch.cuda`` on a machine without a GPU: ``count`` devices, the current one
    ``current``, ``set_device`` calls recorded, and CPU generators as the devices' default generators."""

    def __init__(self, monkeypatch, count: int = 2, current: int = 0):
        self.count, self.current, self.set_calls = count, current, []
        self.generators = tuple(torch.Generator() for _ in range(count))
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        monkeypatch.setattr(torch.cuda, 'device_count', lambda: self.count)
        monkeypatch.setattr(torch.cuda, 'current_device', lambda: self.current)
        monkeypatch.setattr(torch.cuda, 'set_device', self.set_calls.append)
        monkeypatch.setattr(torch.cuda, 'init', lambda: None)
        monkeypatch.setattr(torch.cuda, 'default_generators', self.generators)


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeCuda:
    return FakeCuda(monkeypatch)
