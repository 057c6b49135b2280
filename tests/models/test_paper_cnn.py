import io

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_fmd.models import CIFAR10_MEAN, CIFAR10_STD, PaperCNN


def _x(batch: int = 2, chans: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(seed))


def _create(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('paper_cnn', **kwargs)


@pytest.fixture(scope='module')
def model() -> nn.Module:
    """A shared read-only instance; tests that mutate a model build their own."""
    return _create().eval()


def _expected_params(num_classes: int = 10, in_chans: int = 3, fc1_in: int = 256 * 4 * 4) -> int:
    """Count by hand: 5x5 convs and linears, all with bias; 32 -> 16 -> 8 -> 4 after the three pools."""
    convs = (in_chans * 96 + 96 * 128 + 128 * 256) * 5 * 5 + (96 + 128 + 256)
    fcs = fc1_in * 2048 + 2048 + 2048 * 2048 + 2048
    return convs + fcs + 2048 * num_classes + num_classes


def test_param_count(model):
    assert _expected_params() == 13_741_578
    assert sum(p.numel() for p in model.parameters()) == 13_741_578


def test_architecture_is_the_papers(model):
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (96, (5, 5), (1, 1), (2, 2)), (128, (5, 5), (1, 1), (2, 2)), (256, (5, 5), (1, 1), (2, 2))]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride) for p in pools] == [(3, 2)] * 3
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4096, 2048), (2048, 2048), (2048, 10)]
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())  # no normalization
    assert len([m for m in model.modules() if isinstance(m, nn.ReLU)]) == 5


def test_shapes_and_head_api(model):
    x = _x()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 256, 4, 4)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 2048)
        assert model.forward_head(feats).shape == (2, 10)
        torch.testing.assert_close(model(x), model.fc(model.forward_head(feats, pre_logits=True)))
    assert model.num_features == 256 and model.head_hidden_size == 2048
    assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == 'fc'


def test_feature_info(model):
    assert [(f['num_chs'], f['reduction'], f['module']) for f in model.feature_info] == [
        (96, 2, 'stages.0'), (128, 4, 'stages.1'), (256, 8, 'stages.2'),
        (2048, 32, 'fc_stages.0'), (2048, 32, 'fc_stages.1')]
    for f in model.feature_info:
        assert isinstance(model.get_submodule(f['module']), nn.Sequential)
    assert isinstance(model.get_submodule('fc_stages.1.fc'), nn.Linear)


def test_features_only():
    feats = _create(features_only=True).eval()
    assert feats.feature_info.channels() == [96, 128, 256]
    assert feats.feature_info.reduction() == [2, 4, 8]
    with torch.no_grad():
        assert [tuple(t.shape) for t in feats(_x())] == [(2, 96, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]

    fc_feats = _create(features_only=True, out_indices=(3, 4)).eval()
    assert fc_feats.feature_info.channels() == [2048, 2048]
    full = _create().eval()
    with torch.no_grad():
        out = fc_feats(_x())
        assert [tuple(t.shape) for t in out] == [(2, 2048), (2, 2048)]
        # same weights (same seed): the last FC feature is the model's pre-logits
        torch.testing.assert_close(out[1], full.forward_head(full.forward_features(_x()), pre_logits=True))


def test_reset_classifier_replaces_only_the_classifier():
    model = _create().eval()
    fc_stages, old_fc = model.fc_stages, model.fc
    model.reset_classifier(5)
    assert model.fc_stages is fc_stages and model.fc is not old_fc
    assert model.num_classes == 5 and model.fc.in_features == 2048
    with torch.no_grad():
        assert model(_x()).shape == (2, 5)
        model.reset_classifier(0, global_pool='')
        assert model(_x()).shape == (2, 2048)
    with pytest.raises(ValueError, match="global_pool cannot change from '' to 'avg'"):
        model.reset_classifier(5, global_pool='avg')


def test_num_classes_and_in_chans():
    model = _create(num_classes=100, in_chans=1).eval()
    assert sum(p.numel() for p in model.parameters()) == _expected_params(num_classes=100, in_chans=1)
    with torch.no_grad():
        assert model(_x(chans=1)).shape == (2, 100)


def test_global_pool_and_img_size():
    pooled = _create(global_pool='avg').eval()
    assert pooled.fc_stages[0].fc.in_features == 256
    assert sum(p.numel() for p in pooled.parameters()) == _expected_params(fc1_in=256)
    assert _create(global_pool='catavgmax').fc_stages[0].fc.in_features == 512
    big = _create(img_size=40).eval()  # 40 -> 20 -> 10 -> 5: padded pools round up
    assert big.fc_stages[0].fc.in_features == 256 * 5 * 5
    with torch.no_grad():
        assert pooled(_x(size=48)).shape == (2, 10)
        assert big(_x(size=40)).shape == (2, 10)
        with pytest.raises(ValueError, match=r"take a 4x4 map \(img_size=32\), got \(8, 8\)"):
            _create()(_x(size=64))


def test_drop_rate_acts_in_train_mode_only():
    plain, reg = _create(), _create(seed=1, drop_rate=0.5)
    assert [s.drop.p for s in reg.fc_stages] == [0.5, 0.5]
    reg.load_state_dict(plain.state_dict())
    x = _x(batch=4)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), reg.eval()(x))
        torch.testing.assert_close(plain.train()(x), plain.train()(x))  # nothing random without dropout
        torch.manual_seed(0)
        pre = reg.train().forward_head(reg.forward_features(x), pre_logits=True)
        zero_frac = (pre == 0).float().mean().item()
        plain_zero_frac = (plain.forward_head(plain.forward_features(x), pre_logits=True) == 0).float().mean().item()
    # dropout zeroes half of the units the ReLU left alive: expect about plain + 0.5 * (1 - plain)
    assert zero_frac == pytest.approx(plain_zero_frac + 0.5 * (1 - plain_zero_frac), abs=0.05)


def test_train_step_decreases_loss():
    model = _create().train()
    x, y = _x(batch=4), torch.arange(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # the paper's learning rate
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_pretrained_cfg_and_registry(model):
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 32, 32) and cfg['num_classes'] == 10
    assert cfg['mean'] == CIFAR10_MEAN and cfg['std'] == CIFAR10_STD
    assert cfg['crop_pct'] == 1.0 and cfg['interpolation'] == 'bilinear'
    assert not cfg.get('hf_hub_id') and not cfg.get('url')
    assert isinstance(model.get_submodule(cfg['first_conv']), nn.Conv2d)
    assert model.get_submodule(cfg['classifier']) is model.get_classifier()
    assert timm.list_models('paper_cnn') == ['paper_cnn']
    assert timm.list_models('paper_cnn', pretrained=True) == []


def test_state_dict_round_trip(model):
    other = _create(seed=1).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(model(_x()), other(_x()))


@pytest.mark.parametrize('kwargs, match', [
    (dict(drop_rate=1.0), r'drop_rate must be in \[0, 1\), got 1.0'),
    (dict(drop_rate=-0.5), 'drop_rate'),
    (dict(img_size=0), 'img_size must be a positive int, got 0'),
    (dict(img_size=(32, 32)), 'img_size must be a positive int'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PaperCNN(**kwargs)


def test_narrowed_widths():
    model = timm.create_model('paper_cnn', conv_widths=(32, 64, 128), fc_width=512)
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == [32, 64, 128]
    assert model.fc_stages[0].fc.in_features == 128 * 4 * 4 and model.fc.in_features == 512
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match='conv_widths must be 3 positive ints'):
        timm.create_model('paper_cnn', conv_widths=(32, 64))
    with pytest.raises(ValueError, match='fc_width must be a positive int'):
        timm.create_model('paper_cnn', fc_width=0)
