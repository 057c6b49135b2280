"""benchmarks/paper_gpu.py: device-side augmentation, milestone scaling, tar decoding and both tables end to end."""
import importlib.util
import io
import json
import math
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / 'shared' / 'data' / 'cifar10-jpg'

_spec = importlib.util.spec_from_file_location('paper_gpu', ROOT / 'benchmarks' / 'paper_gpu.py')
paper_gpu = importlib.util.module_from_spec(_spec)
sys.modules['paper_gpu'] = paper_gpu  # dataclasses resolve their annotations through sys.modules
_spec.loader.exec_module(paper_gpu)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n=16, seed=0):
    # values 1..255: the crop's zero padding is then distinguishable from image content
    return torch.randint(1, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ augmentation
def test_random_crop_is_a_shift_of_at_most_4_pixels_with_zero_fill():
    x = _images()
    out = paper_gpu.random_crop(x, 4, _gen())
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    shifts = []
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(9) for dx in range(9)
                 if torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert found, f'sample {i} is no 4-pixel shift of its image'
        shifts.append(found[0])
    assert len(set(shifts)) > 1  # random per sample (all equal by chance: (1/81)^15)


def test_random_hflip_flips_whole_samples():
    x = _images(64)
    assert torch.equal(paper_gpu.random_hflip(x, 1.0, _gen()), x.flip(-1))
    assert torch.equal(paper_gpu.random_hflip(x, 0.0, _gen()), x)
    out = paper_gpu.random_hflip(x, 0.5, _gen())
    flipped = [torch.equal(o, s.flip(-1)) for o, s in zip(out, x)]
    assert all(f or torch.equal(o, s) for f, o, s in zip(flipped, out, x))
    assert 0 < sum(flipped) < 64  # both outcomes occur (fails with probability 2^-63)


def test_random_rotate_zero_degrees_is_identity():
    x = _images().float() / 255
    assert torch.equal(paper_gpu.random_rotate(x, 0.0, _gen()), x)
    torch.testing.assert_close(paper_gpu.random_rotate(x, 0.0, _gen(), mode='bilinear'), x, atol=1e-5, rtol=0)


def test_random_rotate_matches_torchvision_rotation_by_the_drawn_angle():
    x = _images(8).float() / 255
    out = paper_gpu.random_rotate(x, 15.0, _gen(3))
    angles = (torch.rand(8, generator=_gen(3)) * 2 - 1) * 15  # the draw random_rotate makes
    assert angles.abs().max() <= 15 and angles.abs().max() > 1
    for o, img, angle in zip(out, x, angles.tolist()):
        ref = TF.rotate(img, angle, interpolation=TF.InterpolationMode.NEAREST)
        # bit-exact on CPU (positive angles turn counter-clockwise in both); the margin is for float
        # rounding elsewhere, which can move a nearest-neighbour pick by a pixel. The opposite sign: ~6%.
        assert (o == ref).float().mean() > 0.99


def test_rotation_fills_corners_with_zero_and_keeps_the_centre():
    ones = torch.ones(32, 3, 32, 32)
    out = paper_gpu.random_rotate(ones, 15.0, _gen())
    assert torch.equal(out[:, :, 8:24, 8:24], ones[:, :, 8:24, 8:24])
    assert (out[:, :, 0, 0] == 0).any() and out.min() == 0


def test_normalize_uses_the_cifar10_statistics():
    from timm_fmd.models import CIFAR10_MEAN, CIFAR10_STD
    white = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    expected = torch.tensor([(1 - m) / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD)]).view(1, 3, 1, 1)
    torch.testing.assert_close(paper_gpu.normalize(white), expected.expand(2, 3, 4, 4))
    torch.testing.assert_close(paper_gpu.normalize(white.float() / 255), paper_gpu.normalize(white))


def test_train_batch_deterministic_under_a_seed_and_plain_without_augmentation():
    x = _images()
    a = paper_gpu.train_batch(x, True, _gen(1))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, paper_gpu.train_batch(x, True, _gen(1)))
    assert not torch.equal(a, paper_gpu.train_batch(x, True, _gen(2)))
    assert torch.equal(paper_gpu.train_batch(x, False, _gen(1)), paper_gpu.normalize(x))  # Table 1


# ------------------------------------------------------------------------------------------- schedule
def test_scale_milestones():
    assert paper_gpu.scale_milestones((60, 120, 160), 200, 200) == [60, 120, 160]
    assert paper_gpu.scale_milestones((200, 300, 400), 50, 500) == [20, 30, 40]
    assert paper_gpu.scale_milestones((60, 120, 160), 1, 200) == pytest.approx([0.3, 0.6, 0.8])
    with pytest.raises(ValueError, match='epochs must be an int >= 1, got 0'):
        paper_gpu.scale_milestones((60,), 0, 200)


# ----------------------------------------------------------------------------------------- end to end
def _synthetic(n_train=64, n_test=32):
    g = _gen(5)
    return paper_gpu.Data(
        torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (n_train,), generator=g),
        torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (n_test,), generator=g))


def test_both_tables_end_to_end_on_synthetic_data(tmp_path, capsys):
    out = tmp_path / 'results.json'
    seen = []

    def load(data_dir, subset, device):
        seen.append((subset, device))
        return _synthetic()

    payload = paper_gpu.main(['--table', 'both', '--methods', 'fmd', '--epochs', '1', '--batch-size', '32',
                              '--device', 'cpu', '--subset', '64', '--out', str(out)], load_data=load)
    assert seen == [(64, torch.device('cpu'))]
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    assert [(r['table'], r['method'], r['model']) for r in payload['runs']] == [
        (1, 'fmd', 'fmd_paper_cnn'), (2, 'fmd', 'fmd_cifar_preresnet56')]
    for run, prob in zip(payload['runs'], (0.5, 0.05)):
        assert run['epochs'] == 1 and len(run['history']) == 1 and run['seed'] == 0
        assert run['model_kwargs']['fmd_ramp_steps'] == 2  # 64 images / batch 32, ramp over the whole run
        assert run['fmd_prob_final'] == pytest.approx(prob)  # one ramp step per optimiser step: at the target
        assert run['amp'] is False and run['channels_last'] is True
        h = run['history'][0]
        assert math.isfinite(h['train_loss']) and 0 <= h['train_top1'] <= 100 and 0 <= h['test_top1'] <= 100
        assert run['final_test_top1'] == run['best_test_top1'] == h['test_top1']
        assert run['train_images'] == 64 and run['test_images'] == 32
    assert payload['runs'][0]['history'][0]['lr'] == 0.01  # Table 1: no warm-up
    assert payload['runs'][1]['history'][0]['lr'] == 0.0  # Table 2: the release's warm-up starts from 0
    printed = capsys.readouterr().out
    assert 'table 1 fmd seed 0 epoch 1/1' in printed and '| 1 | fmd | 1 | 1 |' in printed
    assert '| 85.24 |' in printed and '| 94.50 |' in printed


def test_baselines_and_seeds_are_deterministic_and_distinct():
    data = _synthetic()
    settings = paper_gpu.RunSettings(epochs=1, batch_size=32, amp=False)
    runs = [paper_gpu.train_run(1, 'dropout', seed, data, settings, log=lambda line: None) for seed in (0, 0, 1)]
    assert runs[0]['model_kwargs'] == {'drop_rate': 0.5} and runs[0]['fmd_prob_final'] is None
    assert runs[0]['history'][0]['train_loss'] == runs[1]['history'][0]['train_loss']
    assert runs[0]['history'][0]['train_loss'] != runs[2]['history'][0]['train_loss']
    table = paper_gpu.results_table(runs)
    assert '| 1 | dropout | 3 | 1 |' in table and '±' in table


def test_cli_rejects_bad_input(capsys):
    with pytest.raises(SystemExit):
        paper_gpu.parse_args(['--table', '2', '--methods', 'dropout'])
    assert 'none is a method of table(s) [2]' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        paper_gpu.parse_args(['--epochs', '0'])
    assert 'expected an integer >= 1, got 0' in capsys.readouterr().err


def test_missing_tars_are_an_error_not_a_download(tmp_path):
    with pytest.raises(FileNotFoundError, match='neither train.tar nor train.jpeg.pt.*nothing is downloaded'):
        paper_gpu.load_cifar10(tmp_path, 8, torch.device('cpu'))


# ------------------------------------------------------------------------------------------------- data
def _image_folder_tar(path, split, classes=('cat', 'airplane'), per_class=3):
    """An ImageFolder tar of 32x32 JPEGs; returns the PIL-decoded images and labels in class-name order."""
    images, labels = [], []
    with tarfile.open(path, 'w') as tf:
        for label, name in enumerate(sorted(classes)):
            for i in range(per_class):
                array = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=_gen(10 * label + i))
                buffer = io.BytesIO()
                Image.fromarray(array.numpy()).save(buffer, format='JPEG')
                info = tarfile.TarInfo(f'{split}/{name}/{i:04d}.jpg')
                info.size = buffer.tell()
                buffer.seek(0)
                tf.addfile(info, buffer)
                buffer.seek(0)
                images.append(TF.pil_to_tensor(Image.open(buffer).convert('RGB')))
                labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def test_tars_and_their_pack_decode_to_the_pil_pixels(tmp_path, monkeypatch):
    monkeypatch.setenv('TIMM_FMD_CACHE', str(tmp_path / 'cache'))
    tars = tmp_path / 'tars'
    tars.mkdir()
    expected = [_image_folder_tar(tars / f'{split}.tar', split) for split in ('train', 'test')]
    data = paper_gpu.load_cifar10(tars, None, torch.device('cpu'))
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    for (images, labels), (ref_images, ref_labels) in zip((data[:2], data[2:]), expected):
        assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)

    packed = paper_gpu.main(['--data-dir', str(tars), '--pack', str(tmp_path / 'packed'), '--device', 'cpu'])
    assert [Path(p).name for p in packed['packed']] == ['train.jpeg.pt', 'test.jpeg.pt']
    assert all(torch.equal(a, b) for a, b in zip(data, paper_gpu.load_cifar10(tmp_path / 'packed', None, 'cpu')))

    subset = paper_gpu.load_cifar10(tmp_path / 'packed', 4, torch.device('cpu'))
    index = paper_gpu.subset_indices(6, 4)
    assert len(index) == 4 and index == sorted(index)
    assert torch.equal(subset.train_images, data.train_images[index])
    assert torch.equal(subset.test_labels, data.test_labels[index])


def test_images_other_than_32x32_are_rejected(tmp_path):
    buffer = io.BytesIO()
    Image.new('RGB', (40, 32)).save(buffer, format='JPEG')
    jpegs = paper_gpu.Jpegs(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8),
                            torch.tensor([0, buffer.tell()]), torch.tensor([0]))
    with pytest.raises(ValueError, match='image 0 is 40x32, expected 32x32'):
        paper_gpu.decode(jpegs, [0])


@pytest.mark.skipif(not (CIFAR / 'train.tar').is_file(), reason=f'no CIFAR-10 tars at {CIFAR}')
def test_cifar10_tars_decode_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('TIMM_FMD_CACHE', str(tmp_path))
    data = paper_gpu.load_cifar10(CIFAR, 12, torch.device('cpu'))
    for images, labels in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
        assert images.shape == (12, 3, 32, 32) and images.dtype == torch.uint8 and images.float().std() > 10
        assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10
    assert sorted(p.name.split('-')[1:3] for p in tmp_path.iterdir()) == [['test', '12'], ['train', '12']]

    def no_read(*args):
        raise AssertionError('read the tar again instead of the cache')

    monkeypatch.setattr(paper_gpu, 'read_split', no_read)
    again = paper_gpu.load_cifar10(CIFAR, 12, torch.device('cpu'))
    assert all(torch.equal(a, b) for a, b in zip(data, again))
