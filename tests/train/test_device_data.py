"""--data-on-device against the loader path: equal batches without augmentation, the loader's pixels for the
loader's parameters, the loader's parameter distributions, exact resume, the cache, and the refusals."""
import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import timm
from timm_fmd.train import fit
from timm_fmd.train import loop
from timm_fmd.train.config import validate
from timm_fmd.train.data import build_splits, loaders_for_model
from timm_fmd.train.device_data import Augment, AugmentParams, device_loaders, load_split, normalize, plan_transforms
from timm_fmd.train.report import MetricsLog

from .conftest import make_image_folder, quick_config

CPU = torch.device('cpu')


def _config(data, output, **overrides):
    """quick_config with the CIFAR recipes' pad crop (the trainer's default is timm's random-resized crop)."""
    return quick_config(data, output, **{'train_crop_mode': 'pad', **overrides})


@pytest.fixture(scope='module')
def odd_sized(tmp_path_factory):
    """3 classes x (8 train, 2 val) images of 20x20: the transforms resize them to 16x16."""
    return make_image_folder(tmp_path_factory.mktemp('odd'), {'train': 8, 'val': 2}, size=20, seed=3)


def _model():
    return timm.create_model('test_efficientnet', num_classes=3)


def _both(cfg, rank=0, world_size=1):
    splits = build_splits(cfg)
    model = _model()
    return (loaders_for_model(cfg, splits, model, rank, world_size),
            device_loaders(cfg, splits, model, CPU, rank, world_size))


def _batches(loader, epoch=None):
    if epoch is not None:
        loader.train_sampler.set_epoch(epoch)
    return [(x, y) for x, y, _ in loader.train]


@pytest.mark.parametrize('rank,world_size', [(0, 1), (1, 2)])
def test_without_augmentation_the_batches_equal_the_loaders(odd_sized, tmp_path, rank, world_size):
    """Same images (resized by the same PIL calls), same order, same float ops: bit-equal, per DDP shard too."""
    cfg = _config(odd_sized, tmp_path, no_aug=True, batch_size=4, validation_batch_size=5)
    loaders, on_device = _both(cfg, rank, world_size)
    for epoch in (0, 1):
        expected, got = _batches(loaders, epoch), _batches(on_device, epoch)
        assert len(got) == len(expected) == 24 // world_size // 4
        for (x, y), (gx, gy) in zip(expected, got):
            assert gx.shape == x.shape == (4, 3, 16, 16) and gx.dtype == torch.float32
            assert torch.equal(gx, x) and torch.equal(gy, y)
    val = [(x, y) for x, y, _ in loaders.val]
    assert len(val) == len(on_device.val) and all(
        torch.equal(gx, x) and torch.equal(gy, y) for (x, y), (gx, gy, _) in zip(val, on_device.val))
    assert on_device.data_config == loaders.data_config


def test_resume_start_skips_the_consumed_samples(odd_sized, tmp_path):
    cfg = _config(odd_sized, tmp_path, batch_size=4, crop_pad=2, hflip=0.5, rotate=10.0)
    _, on_device = _both(cfg)
    full = _batches(on_device, 3)
    on_device.train_sampler.set_epoch(3, start=8)
    resumed = [(x, y) for x, y, _ in on_device.train]
    assert len(resumed) == len(full) - 2
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(full[2:], resumed))


class _Spy:
    """Records the parameters torchvision's random transforms draw in the loader path, one entry per sample."""

    def __init__(self, monkeypatch):
        self.top, self.left, self.hflip, self.vflip, self.angle = [], [], [], [], []
        crop_params, rotation_params = T.RandomCrop.get_params, T.RandomRotation.get_params

        def crop(img, size):
            i, j, h, w = crop_params(img, size)
            self.top.append(i)
            self.left.append(j)
            return i, j, h, w

        def rotation(degrees):
            angle = rotation_params(degrees)
            self.angle.append(angle)
            return angle

        def flip(record, forward):
            def spy(module, img):
                out = forward(module, img)
                record.append(out is not img)  # torchvision returns the input itself when it does not flip
                return out
            return spy

        monkeypatch.setattr(T.RandomCrop, 'get_params', staticmethod(crop))
        monkeypatch.setattr(T.RandomRotation, 'get_params', staticmethod(rotation))
        monkeypatch.setattr(T.RandomHorizontalFlip, 'forward', flip(self.hflip, T.RandomHorizontalFlip.forward))
        monkeypatch.setattr(T.RandomVerticalFlip, 'forward', flip(self.vflip, T.RandomVerticalFlip.forward))

    def params(self) -> AugmentParams:
        return AugmentParams(*(np.array(v) for v in (self.top, self.left, self.hflip, self.vflip, self.angle)))


def _augmenting_config(data, tmp_path, **overrides):
    values = dict(batch_size=4, crop_pad=2, hflip=0.5, vflip=0.5, rotate=12.0)
    values.update(overrides)
    return _config(data, tmp_path, **values)


def test_the_loaders_parameters_give_the_loaders_pixels(odd_sized, tmp_path, monkeypatch):
    """Pad crop, both flips and PIL's bilinear rotation, fed the parameters the loader drew, equal the
    loader's images bit for bit."""
    cfg = _augmenting_config(odd_sized, tmp_path)
    loaders, on_device = _both(cfg)
    spy = _Spy(monkeypatch)
    expected = torch.cat([x for x, _ in _batches(loaders, 0)])
    params = spy.params()
    assert len(params.angle) == 24 and params.hflip.any() and not params.hflip.all() and params.vflip.any()
    order = torch.from_numpy(loaders.train_sampler.positions())
    head, augment, mean, std = plan_transforms(loaders.train.dataset.transform)
    assert augment == Augment(padding=2, hflip=0.5, vflip=0.5, degrees=(-12.0, 12.0))
    images, _ = load_split(build_splits(cfg).train_reader, build_splits(cfg).train_indices, head)
    got = augment(images[order], Augment.table(params, CPU))
    got = normalize(got, *(torch.tensor(v).view(1, -1, 1, 1) for v in (mean, std)))
    assert torch.equal(got, expected)


def test_rotation_equals_pils_bilinear_rotation():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g)
    angles = (torch.rand(48, generator=g, dtype=torch.float64) * 30 - 15).numpy()
    zeros = np.zeros(48)
    params = AugmentParams(zeros, zeros, zeros.astype(bool), zeros.astype(bool), angles)
    got = Augment(degrees=(-15.0, 15.0))(images, Augment.table(params, CPU))
    expected = torch.stack([TF.pil_to_tensor(TF.rotate(TF.to_pil_image(im), float(a),
                                                       interpolation=T.InterpolationMode.BILINEAR))
                            for im, a in zip(images, angles)])
    assert got.dtype == torch.float64 and torch.equal(got, expected.double())
    assert (got[:, :, 0, 0] == 0).any()  # corners rotated in from outside are the zero fill


def test_parameter_distributions_match_the_loaders(tmp_path, monkeypatch):
    """Crop offsets, flip rates and rotation angles of the device path against the loader's over 1,920 samples
    each (48 images x 40 epochs). Tolerances for these fixed seeds, each a test at the 0.1% level: offsets
    chi-square (4 dof) < 18.5 against uniform on 0..4 per axis; flip rates within 4 standard errors (0.046)
    of each other; angles' two-sample Kolmogorov-Smirnov distance < 1.95 * sqrt(2 / n) = 0.063."""
    data = make_image_folder(tmp_path / 'data', {'train': 16, 'val': 1}, size=8, seed=4)
    cfg = _augmenting_config(data, tmp_path, img_size=8, batch_size=48, vflip=0.3)
    loaders, on_device = _both(cfg)
    spy = _Spy(monkeypatch)
    for epoch in range(40):
        _batches(loaders, epoch)
    loader = spy.params()
    device = AugmentParams(*(np.concatenate(v) for v in zip(*(on_device.train.augment.draw(48, cfg.seed, epoch)
                                                               for epoch in range(40)))))
    n = 1920
    assert len(loader.angle) == len(device.angle) == n
    for params in (loader, device):
        for offsets in (params.top, params.left):
            counts = np.bincount(offsets, minlength=5)
            assert len(counts) == 5 and ((counts - n / 5) ** 2 / (n / 5)).sum() < 18.5
        assert np.abs(params.angle).max() <= 12.0
    for name, p in (('hflip', 0.5), ('vflip', 0.3)):
        a, b = getattr(loader, name).mean(), getattr(device, name).mean()
        assert abs(a - b) < 4 * math.sqrt(2 * p * (1 - p) / n), (name, a, b)
    grid = np.linspace(-12, 12, 241)
    ks = np.abs((loader.angle[:, None] <= grid).mean(0) - (device.angle[:, None] <= grid).mean(0)).max()
    assert ks < 1.95 * math.sqrt(2 / n)


def test_fit_resumes_exactly_from_a_mid_epoch_checkpoint(tiny_data, tmp_path, monkeypatch):
    cfg = _config(tiny_data, tmp_path / 'ref', data_on_device=True, epochs=2, crop_pad=2, hflip=0.5,
                       rotate=10.0, checkpoint_interval=4)
    fit(cfg)
    saves, save = [], loop._save

    def crash_after_the_first_checkpoint(run, pos):
        save(run, pos)
        saves.append(pos.global_step)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, '_save', crash_after_the_first_checkpoint)
    crashed = dataclasses.replace(cfg, output=str(tmp_path / 'crashed'))
    with pytest.raises(KeyboardInterrupt):
        fit(crashed)
    assert saves == [4]  # mid-epoch: 6 steps an epoch
    monkeypatch.setattr(loop, '_save', save)
    fit(dataclasses.replace(crashed, resume=str(tmp_path / 'crashed' / 'run')))
    timing = ('images_per_sec', 'epoch_time_s')
    rows = [[{k: v for k, v in r.items() if k not in timing} for r in MetricsLog.read(d / 'run' / 'metrics.csv').rows]
            for d in (tmp_path / 'ref', tmp_path / 'crashed')]
    assert rows[0] == rows[1] and len(rows[0]) == 2


def test_decoded_once_then_from_the_cache(odd_sized, tmp_path, monkeypatch, cache_dir):
    cfg = _config(odd_sized, tmp_path, data_on_device=True)
    splits = build_splits(cfg)
    head = T.Compose([T.Resize((16, 16)), T.CenterCrop(16)])
    first = load_split(splits.train_reader, splits.train_indices, head)
    assert first[0].shape == (24, 3, 16, 16) and first[0].dtype == torch.uint8
    assert not list((cache_dir / 'device-data').glob('*.tmp'))

    def no_decode(*args):
        raise AssertionError('decoded again instead of reading the cache')

    monkeypatch.setattr('timm_fmd.train.device_data._decode', no_decode)
    again = load_split(splits.train_reader, splits.train_indices, head)
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    with pytest.raises(AssertionError, match='decoded again'):  # other samples: another key
        load_split(splits.train_reader, splits.train_indices[:5], head)
    with pytest.raises(AssertionError, match='decoded again'):  # another decoding: another key
        load_split(splits.train_reader, splits.train_indices, T.Compose([T.Resize((12, 12))]))


def test_a_changed_file_is_decoded_again(tmp_path, cache_dir):
    data = make_image_folder(tmp_path / 'data', {'train': 2, 'val': 1}, size=8, seed=5)
    cfg = _config(data, tmp_path, data_on_device=True, img_size=8)
    splits = build_splits(cfg)
    head = T.Compose([T.CenterCrop(8)])
    before, _ = load_split(splits.train_reader, splits.train_indices, head)
    path = data / 'train' / 'circle' / '000.png'
    Image.new('RGB', (8, 8), (255, 0, 0)).save(path)
    after, _ = load_split(build_splits(cfg).train_reader, splits.train_indices, head)
    assert not torch.equal(before[0], after[0]) and torch.equal(after[0, 0], torch.full((8, 8), 255, dtype=torch.uint8))


@pytest.mark.parametrize('option,value,message', [
    ('aa', 'rand-m9-mstd0.5', r"--aa: got 'rand-m9-mstd0.5', which --data-on-device does not support"),
    ('reprob', 0.25, '--reprob: got 0.25, which --data-on-device does not support'),
    ('color_jitter', 0.4, '--color-jitter: got 0.4, which --data-on-device does not support'),
    ('train_crop_mode', 'rrc', "--train-crop-mode: got 'rrc', which --data-on-device does not support .*pad crop"),
    ('skip_corrupt', True, '--skip-corrupt: got True, which --data-on-device does not support'),
])
def test_unsupported_augmentations_are_refused_by_name(tiny_data, tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        validate(_config(tiny_data, tmp_path, data_on_device=True, **{option: value}))
    validate(_config(tiny_data, tmp_path, data_on_device=False, **{option: value}))  # the loader has them


def test_a_transform_without_a_device_version_is_refused():
    norm = T.Normalize((0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match=r'--data-on-device: the transform RandomResizedCrop\(.*has no device version'):
        plan_transforms(T.Compose([T.RandomResizedCrop(16), T.ToTensor(), norm]))
    with pytest.raises(ValueError, match=r'RandomRotation\(.*only bilinear'):
        plan_transforms(T.Compose([T.RandomRotation(10), T.ToTensor(), norm]))
    with pytest.raises(ValueError, match='where ToTensor \\+ Normalize were expected'):
        plan_transforms(T.Compose([T.Resize(16), T.ToTensor()]))
    head, augment, mean, std = plan_transforms(T.Compose([T.Resize(16), T.CenterCrop(16), T.ColorJitter(),
                                                          T.ToTensor(), norm]))
    assert len(head.transforms) == 2 and augment.identity and mean == std == (0.5,) * 3


def test_unreadable_images_are_named(tmp_path):
    data = make_image_folder(tmp_path / 'data', {'train': 2, 'val': 1}, size=8, seed=6)
    (data / 'train' / 'square' / 'broken.png').write_bytes(b'not a png')
    cfg = _config(data, tmp_path, data_on_device=True, img_size=8, batch_size=2)
    with pytest.raises(ValueError, match=r"unreadable image\(s\) \[.*broken.png'\].*train without --data-on-device"):
        fit(cfg)


def test_fit_on_device_with_mixup_and_ema(tiny_data, tmp_path):
    """timm's Mixup/CutMix take the device batches as they are (one-hot targets on the batch's device)."""
    results = fit(_config(tiny_data, tmp_path, data_on_device=True, mixup=0.2, cutmix=1.0, model_ema=True,
                               model_ema_decay=0.5, crop_pad=2, hflip=0.5))
    row, = MetricsLog.read(tmp_path / 'run' / 'metrics.csv').rows
    assert row['train_top1'] is None and math.isfinite(row['train_loss']) and results['global_steps'] == 6
    assert results['data']['input_size'] == [3, 16, 16] and results['evaluated_weights'] == 'ema'


def test_a_data_set_larger_than_half_the_free_memory_is_refused(tiny_data, tmp_path, monkeypatch):
    import timm_fmd.train.device_data as device_data
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device: (3 * 2 ** 30, 80 * 2 ** 30))
    assert device_data._available_memory(torch.device('cuda', 0)) == 3 * 2 ** 30
    assert device_data._available_memory(CPU) > 0  # the host's MemAvailable
    monkeypatch.setattr(device_data, '_available_memory', lambda device: 2 * 60 * 3 * 16 * 16 - 1)
    cfg = _config(tiny_data, tmp_path, data_on_device=True)
    with pytest.raises(ValueError, match=r'--data-on-device: the data set takes 0.00 GiB as uint8, more than half of '
                                         r'the 0.00 GiB free on cpu; train without --data-on-device'):
        device_loaders(cfg, build_splits(cfg), _model(), CPU)
    monkeypatch.setattr(device_data, '_available_memory', lambda device: 2 * 60 * 3 * 16 * 16)
    device_loaders(cfg, build_splits(cfg), _model(), CPU)  # 60 images of 3 x 16 x 16 fit in twice their size


_FEW_FILES = """
import resource, sys, torch, torchvision.transforms as T
from timm_fmd.train.device_data import _decode
from timm_fmd.train.data import build_splits
from timm_fmd.train.config import TrainConfig
splits = build_splits(TrainConfig(data_dir=sys.argv[1], val_split='val', output=sys.argv[2]))
head = T.Compose([T.CenterCrop(4)])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # 330 images kept, more than 256 open files
images, labels = _decode(splits.train_reader, splits.train_indices, head, 2)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
reference = _decode(splits.train_reader, splits.train_indices, head, 0)
assert images.shape == (330, 3, 4, 4), images.shape
assert torch.equal(images, reference[0]) and torch.equal(labels, reference[1])
print('decoded', len(images))
"""


def test_decoding_more_images_than_open_files_allowed(tmp_path):
    """Decoded by worker processes, a data set of more images than ``ulimit -n`` allows open files (60 000
    JPEGs of CIFAR-10 against 20 000 here) decodes, equal to decoding in-process (a subprocess: the limit is
    the process's, and before the fix the loader hung rather than failed)."""
    pytest.importorskip('resource')
    data = make_image_folder(tmp_path / 'data', {'train': 110, 'val': 1}, size=4, seed=6)
    done = subprocess.run([sys.executable, '-c', _FEW_FILES, str(data), str(tmp_path / 'out')], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == 'decoded 330', done.stderr[-2000:]
