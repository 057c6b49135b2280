import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms as T

from timm_fmd.train import TrainConfig
from timm_fmd.train.data import (DataError, EpochSampler, SampleDataset, build_loaders, build_splits, build_transforms,
                                 collate, digits_root, loaders_for_model)

from .conftest import make_image_folder

DATA_CONFIG = dict(input_size=(3, 16, 16), interpolation='bilinear', mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0,
                   crop_mode='center')


def test_embedded_digits_are_written_once_as_an_image_folder(cache_dir):
    root = digits_root()
    assert root.parent == cache_dir
    counts = {split: sorted(len(list((root / split / str(c)).glob('*.png'))) for c in range(10))
              for split in ('train', 'val')}
    assert sum(counts['train']) + sum(counts['val']) == 1797 and sum(counts['val']) == 1797 // 5
    with Image.open(next((root / 'val' / '3').glob('*.png'))) as img:
        assert img.size == (32, 32) and img.mode == 'L'
    stamp = (root / 'train').stat().st_mtime_ns
    assert digits_root() == root and (root / 'train').stat().st_mtime_ns == stamp
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith('.')] == []  # no temp dir left


def test_folder_with_val_split(tiny_data):
    splits = build_splits(TrainConfig(data_dir=str(tiny_data)))
    assert splits.label_names == ['circle', 'square', 'stripes']
    assert splits.info == dict(name=str(tiny_data), val_split='val', carve_seed=None, train_size=48, val_size=12)


def test_test_split_and_tar(tmp_path):
    root = make_image_folder(tmp_path / 'folder', {'train': 3, 'test': 2})
    assert build_splits(TrainConfig(data_dir=str(root))).info['val_split'] == 'test'
    for split in ('train', 'test'):
        with tarfile.open(tmp_path / f'{split}.tar', 'w') as tar:
            tar.add(root / split, arcname=split)
    splits = build_splits(TrainConfig(data_dir=str(tmp_path / 'train.tar')))
    assert splits.label_names == ['circle', 'square', 'stripes']
    assert (splits.info['val_split'], splits.info['train_size'], splits.info['val_size']) == ('test', 9, 6)
    img, target = SampleDataset(splits.val_reader, splits.val_indices, T.ToTensor())[(5, 0)]
    assert img.shape == (3, 16, 16) and target == 2


def test_carved_split_is_seeded_and_disjoint(tmp_path):
    root = make_image_folder(tmp_path, {'all': 10}) / 'all'
    a = build_splits(TrainConfig(data_dir=str(root), carve_fraction=0.2, carve_seed=3))
    b = build_splits(TrainConfig(data_dir=str(root), carve_fraction=0.2, carve_seed=3))
    c = build_splits(TrainConfig(data_dir=str(root), carve_fraction=0.2, carve_seed=4))
    assert a.info == dict(name=str(root), val_split='carved', carve_seed=3, train_size=24, val_size=6)
    assert np.array_equal(a.val_indices, b.val_indices) and not np.array_equal(a.val_indices, c.val_indices)
    assert set(a.val_indices).isdisjoint(a.train_indices) and len(set(a.val_indices) | set(a.train_indices)) == 30


def test_bad_data_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere'):
        build_splits(TrainConfig(data_dir=str(tmp_path / 'nowhere')))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='empty.* is empty'):
        build_splits(TrainConfig(data_dir=str(tmp_path / 'empty')))
    (tmp_path / 'notes.txt').write_text('x')
    with pytest.raises(ValueError, match='notes.txt is a file but not a .tar'):
        build_splits(TrainConfig(data_dir=str(tmp_path / 'notes.txt')))
    root = make_image_folder(tmp_path / 'd', {'train': 2, 'val': 1})
    (root / 'train' / 'ghost').mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) with no images in .*train: \['ghost'\]"):
        build_splits(TrainConfig(data_dir=str(root)))
    shutil.rmtree(root / 'train' / 'ghost')
    with pytest.raises(FileNotFoundError, match='--val-split: no holdout/'):
        build_splits(TrainConfig(data_dir=str(root), val_split='holdout'))
    make_image_folder(root, {'val': 1}, classes=('circle', 'stripes'))
    (root / 'val' / 'extra').mkdir()
    Image.new('RGB', (4, 4)).save(root / 'val' / 'extra' / 'a.png')
    with pytest.raises(ValueError, match=r"classes missing from .*train: \['extra'\]"):
        build_splits(TrainConfig(data_dir=str(root)))
    files = tmp_path / 'files'
    files.mkdir()
    (files / 'a.png').write_bytes(b'')
    with pytest.raises(ValueError, match='has no class folders'):
        build_splits(TrainConfig(data_dir=str(files)))


def test_corrupt_image_error_or_counted_skip(tmp_path):
    root = make_image_folder(tmp_path, {'train': 2, 'val': 1})
    bad = root / 'train' / 'square' / '001.png'
    bad.write_bytes(b'not a png')
    splits = build_splits(TrainConfig(data_dir=str(root)))
    dataset = SampleDataset(splits.train_reader, splits.train_indices, T.ToTensor())
    with pytest.raises(DataError, match=r"cannot decode image '.*square/001.png'.*--skip-corrupt\)$"):
        dataset.__getitems__([(i, 0) for i in range(6)])
    dataset.skip_corrupt = True
    x, y, skipped = collate(dataset.__getitems__([(i, 0) for i in range(6)]))
    assert x.shape == (5, 3, 16, 16) and len(y) == 5 and skipped == [str(bad)]
    with pytest.raises(DataError, match='every image of a batch is unreadable'):
        collate(dataset.__getitems__([(3, 0)]))


def test_a_worker_error_arrives_as_its_own_one_line_message(tmp_path):
    """torch rebuilds a worker's exception from text holding the whole worker traceback; ours comes first."""
    root = make_image_folder(tmp_path, {'train': 2, 'val': 1})
    (root / 'train' / 'circle' / '000.png').write_bytes(b'not a png')
    cfg = TrainConfig(data_dir=str(root), batch_size=2, workers=1)
    loaders = build_loaders(cfg, build_splits(cfg), build_transforms(cfg, DATA_CONFIG))
    with pytest.raises(DataError) as raised:
        list(loaders.train)
    message = str(raised.value)
    assert '\n' not in message and message.startswith("cannot decode image '") and 'circle/000.png' in message
    assert message.endswith('(fix or remove it, or pass --skip-corrupt) [in DataLoader worker process 0]')
    assert 'Traceback (most recent call last)' in raised.value.worker_traceback


def test_a_failing_transform_names_the_image(tmp_path):
    root = make_image_folder(tmp_path, {'train': 1, 'val': 1})
    splits = build_splits(TrainConfig(data_dir=str(root)))
    dataset = SampleDataset(splits.train_reader, splits.train_indices, T.RandomCrop(32))  # larger than 16x16
    with pytest.raises(DataError, match=r"the transform failed on image '.*circle/000.png' \(16x16\): ValueError: "
                                        r"Required crop size \(32, 32\) is larger than input image size"):
        dataset[(0, 0)]


def test_images_of_any_mode_reach_the_model_as_faithful_rgb(tmp_path):
    """A 16-bit grayscale PNG in the data folder: v / 257 in every channel, not PIL's clipped 255."""
    root = make_image_folder(tmp_path, {'train': 1, 'val': 1})
    values = np.array([[1799, 57311], [0, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(root / 'train' / 'circle' / '000.png')
    splits = build_splits(TrainConfig(data_dir=str(root)))
    img, target = SampleDataset(splits.train_reader, splits.train_indices, T.PILToTensor())[(0, 0)]
    assert target == 0 and img.tolist() == [[[7, 223], [0, 255]]] * 3


def test_epoch_sampler_order_shards_and_resume():
    single = EpochSampler(10, shuffle=True, seed=0)
    single.set_epoch(1)
    order = list(single)
    assert sorted(p for p, _ in order) == list(range(10))
    single.set_epoch(2)
    assert list(single) != order
    single.set_epoch(1)
    assert list(single) == order  # a function of (seed, epoch) only
    shards = [EpochSampler(10, True, 0, num_replicas=3, rank=r) for r in range(3)]
    for s in shards:
        s.set_epoch(1)
    lists = [list(s) for s in shards]
    assert [len(x) for x in lists] == [4, 4, 4]  # padded like DistributedSampler
    interleaved = [lists[r][i] for i in range(4) for r in range(3)]
    assert interleaved[:10] == order  # same samples, same augmentation seeds as one process
    single.set_epoch(1, start=7)
    assert list(single) == order[7:] and len(single) == 3
    val = EpochSampler(10, False, 0, num_replicas=3, rank=2, pad=False)
    assert [p for p, _ in val] == [2, 5, 8]


def test_augmentation_depends_only_on_the_sample_seed(tiny_data):
    cfg = TrainConfig(data_dir=str(tiny_data), rotate=15.0, hflip=0.5, crop_pad=4)
    splits = build_splits(cfg)
    train_tf, _ = build_transforms(cfg, DATA_CONFIG)
    dataset = SampleDataset(splits.train_reader, splits.train_indices, train_tf)
    torch.manual_seed(1)
    random.seed(1)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a = dataset.__getitems__([(0, 11), (1, 12), (2, 13)])
    b = dataset.__getitems__([(2, 13), (0, 11)])
    assert torch.equal(a[0][0], b[1][0]) and torch.equal(a[2][0], b[0][0])
    assert not torch.equal(dataset[(0, 11)][0], dataset[(0, 99)][0])
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1])
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])


def test_loader_batches_do_not_depend_on_workers(tiny_data):
    cfg = TrainConfig(data_dir=str(tiny_data), batch_size=8, rotate=15.0, hflip=0.5)
    splits = build_splits(cfg)
    transforms = build_transforms(cfg, DATA_CONFIG)
    batches = []
    for workers in (0, 2):
        loaders = build_loaders(TrainConfig(**{**cfg.__dict__, 'workers': workers}), splits, transforms)
        loaders.train_sampler.set_epoch(3)
        batches.append([x for x, _, _ in loaders.train])
    assert len(batches[0]) == 6 and all(torch.equal(a, b) for a, b in zip(*batches))


def test_transforms(tiny_data):
    cfg = TrainConfig(train_crop_mode='pad', crop_pad=4, rotate=15.0, hflip=0.5)
    train_tf, eval_tf = build_transforms(cfg, DATA_CONFIG)
    names = [type(t).__name__ for t in train_tf.transforms]
    assert names[:5] == ['Resize', 'CenterCrop', 'RandomCrop', 'RandomHorizontalFlip', 'RandomRotation']
    assert train_tf.transforms[2].padding == 4 and train_tf.transforms[4].degrees == [-15.0, 15.0]
    rrc, _ = build_transforms(TrainConfig(train_crop_mode='rrc', rotate=0.0, aa='rand-m9-mstd0.5', reprob=0.25),
                              DATA_CONFIG)
    names = [type(t).__name__ for t in rrc.transforms]
    assert names[0] == 'RandomResizedCropAndInterpolation' and 'RandAugment' in names and 'RandomErasing' in names
    plain, _ = build_transforms(TrainConfig(no_aug=True), DATA_CONFIG)
    img = Image.new('RGB', (20, 24), (255, 0, 0))
    assert torch.equal(plain(img), plain(img)) and eval_tf(img).shape == (3, 16, 16)


CIFAR10 = Path('/work/shared/data/cifar10-jpg/train.tar')


@pytest.mark.skipif(not CIFAR10.is_file(), reason='the CIFAR-10 JPEG tars exist only beside the development checkout')
def test_cifar10_tar_finds_its_test_split():
    splits = build_splits(TrainConfig(data_dir=str(CIFAR10)))
    assert splits.label_names == ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                                  'truck']
    assert (splits.info['val_split'], splits.info['train_size'], splits.info['val_size']) == ('test', 50000, 10000)


def test_without_a_recipe_the_transforms_are_the_models_own(tiny_data):
    """--data-dir with no --config: test_efficientnet's pretrained_cfg (160 px, bicubic, crop 0.95, ImageNet
    mean/std) decides the input, as timm.data.resolve_model_data_config gives it to inference code."""
    cfg = TrainConfig(data_dir=str(tiny_data), model='test_efficientnet', batch_size=4, workers=0)
    model = timm.create_model('test_efficientnet', num_classes=3)
    loaders = loaders_for_model(cfg, build_splits(cfg), model)
    assert loaders.data_config == dict(input_size=(3, 160, 160), interpolation='bicubic', mean=(0.485, 0.456, 0.406),
                                       std=(0.229, 0.224, 0.225), crop_pct=0.95, crop_mode='center')
    assert loaders.data_config == timm.data.resolve_model_data_config(model)
    x, _, _ = next(iter(loaders.val))
    assert x.shape == (4, 3, 160, 160)
    eval_tf = loaders.val.dataset.transform
    assert [type(t).__name__ for t in eval_tf.transforms][:2] == ['Resize', 'CenterCrop']
    assert eval_tf.transforms[0].size == 168 and eval_tf.transforms[1].size == (160, 160)  # 160 / 0.95
