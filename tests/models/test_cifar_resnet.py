import io

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropBlock2d, DropPath

from timm_fmd.models import CIFAR10_MEAN, CIFAR10_STD, BasicBlock, CifarResNet, PreActBasicBlock

DEPTHS = (20, 32, 44, 56, 110)
NAMES = [f'cifar_{kind}{d}' for kind in ('resnet', 'preresnet') for d in DEPTHS]


def _x(batch: int = 2, chans: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, chans, 32, 32, generator=torch.Generator().manual_seed(seed))


def _create(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs)


def _expected_params(depth: int, preact: bool, num_classes: int = 10, in_chans: int = 3) -> int:
    """Count by hand: bias-free convs, BN = weight + bias, linear classifier with bias."""
    def conv(cin, cout, k=3):
        return cin * cout * k * k

    def bn(c):
        return 2 * c

    total = conv(in_chans, 16) + (0 if preact else bn(16))  # preact stem is a bare conv
    cin = 16
    for cout in (16, 32, 64):
        for _ in range((depth - 2) // 6):
            total += conv(cin, cout) + conv(cout, cout)
            total += bn(cin) + bn(cout) if preact else 2 * bn(cout)
            if cin != cout:  # projection shortcut: 1x1 conv, + BN when post-activation (option B)
                total += conv(cin, cout, k=1) + (0 if preact else bn(cout))
            cin = cout
    total += bn(64) if preact else 0  # final bn-relu of the pre-activation net
    return total + 64 * num_classes + num_classes


def test_hand_counts_match_known_totals():
    # anchor the formula itself: He et al. quote ~0.27M for ResNet-20 and ~0.85M for ResNet-56
    assert _expected_params(20, preact=False) == 272_474
    assert _expected_params(56, preact=False) == 855_770
    assert _expected_params(20, preact=True) == 272_282
    assert _expected_params(56, preact=True) == 855_578


@pytest.mark.parametrize('name', NAMES)
def test_registered_params_and_shapes(name):
    model = _create(name).eval()
    depth, preact = int(name.split('resnet')[1]), 'preresnet' in name
    assert sum(p.numel() for p in model.parameters()) == _expected_params(depth, preact)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == depth  # 6n+2 weighted layers: 3x3 convs + the classifier
    with torch.no_grad():
        assert model(_x()).shape == (2, 10)
        assert model.forward_features(_x()).shape == (2, 64, 8, 8)
    assert model.pretrained_cfg['input_size'] == (3, 32, 32)


def test_list_models():
    assert sorted(timm.list_models('cifar_*')) == sorted(NAMES)
    # only the checkpoints this project trained have weights (their tags: timm_fmd.models.cifar_resnet.PUBLISHED)
    assert set(timm.list_models('cifar_*', pretrained=True)) == {
        'cifar_resnet20', 'cifar_resnet20.bfmd_cifar10', 'cifar_resnet20.bfmd_digits'}


@pytest.mark.parametrize('name', ['cifar_resnet32', 'cifar_preresnet20'])
def test_pretrained_cfg(name):
    cfg = _create(name).pretrained_cfg
    assert cfg['input_size'] == (3, 32, 32)
    assert cfg['mean'] == CIFAR10_MEAN == (0.4914, 0.4822, 0.4465)
    assert cfg['std'] == CIFAR10_STD == (0.2470, 0.2435, 0.2616)
    assert cfg['crop_pct'] == 1.0 and cfg['interpolation'] == 'bilinear'
    assert cfg['num_classes'] == 10 and cfg['classifier'] == 'fc' and cfg['first_conv'] == 'stem.conv'
    assert not cfg.get('hf_hub_id') and not cfg.get('url')
    model = _create(name)
    assert isinstance(model.get_submodule(cfg['first_conv']), nn.Conv2d)
    assert model.get_submodule(cfg['classifier']) is model.get_classifier()
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg['mean'] == CIFAR10_MEAN and data_cfg['input_size'] == (3, 32, 32)


def test_pretrained_true_fails_without_weights():
    with pytest.raises(RuntimeError, match='No pretrained weights'):
        timm.create_model('cifar_resnet32', pretrained=True)


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_preresnet20'])
def test_feature_info_and_features_only(name):
    model = _create(name)
    assert [(f['num_chs'], f['reduction'], f['module']) for f in model.feature_info] == [
        (16, 1, 'stages.0'), (32, 2, 'stages.1'), (64, 4, 'stages.2')]
    for f in model.feature_info:
        assert model.get_submodule(f['module']) is model.stages[int(f['module'][-1])]

    feats = _create(name, features_only=True).eval()
    assert feats.feature_info.channels() == [16, 32, 64]
    assert feats.feature_info.reduction() == [1, 2, 4]
    with torch.no_grad():
        assert [tuple(t.shape) for t in feats(_x())] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]
    last = _create(name, features_only=True, out_indices=(2,))
    assert last.feature_info.channels() == [64]


def test_features_only_match_forward_features_post_activation():
    model, feats = _create('cifar_resnet20').eval(), _create('cifar_resnet20', features_only=True).eval()
    feats.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(feats(_x())[-1], model.forward_features(_x()))


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_preresnet20'])
def test_head_api(name):
    model = _create(name).eval()
    x = _x()
    with torch.no_grad():
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 64)
        assert model.num_features == model.head_hidden_size == 64
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
        assert model.get_classifier(name_only=True) == 'fc'
        model.reset_classifier(0)
        assert model(x).shape == (2, 64)
        model.reset_classifier(7, global_pool='catavgmax')
        assert model.head_hidden_size == 128 and model(x).shape == (2, 7)
        assert _create(name, num_classes=100)(x).shape == (2, 100)
        assert _create(name, in_chans=1)(_x(chans=1)).shape == (2, 10)
        assert _create(name, num_classes=0, global_pool='')(x).shape == (2, 64, 8, 8)


def test_in_chans_and_num_classes_change_param_count():
    model = _create('cifar_preresnet32', num_classes=100, in_chans=1)
    assert sum(p.numel() for p in model.parameters()) == _expected_params(32, True, num_classes=100, in_chans=1)


def _bn_eval_random(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(t.shape, generator=gen))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False)


def test_post_activation_block_matches_reference():
    gen = torch.Generator().manual_seed(1)
    block = BasicBlock(16, 32, stride=2).eval()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            _bn_eval_random(m, gen)
    x = torch.randn(2, 16, 8, 8, generator=gen)
    ds_conv, ds_bn = block.downsample
    ref = F.relu(_bn(block.conv1(x), block.bn1))
    ref = _bn(block.conv2(ref), block.bn2) + _bn(ds_conv(x), ds_bn)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(ref))
    assert [n for n, _ in block.named_children()] == [
        'conv1', 'bn1', 'drop_block', 'act1', 'conv2', 'bn2', 'drop_path', 'act2', 'downsample']


def test_pre_activation_block_matches_reference():
    gen = torch.Generator().manual_seed(2)
    block = PreActBasicBlock(16, 32, stride=2).eval()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            _bn_eval_random(m, gen)
    x = torch.randn(2, 16, 8, 8, generator=gen)
    ref = block.conv1(F.relu(_bn(x, block.bn1)))
    ref = block.conv2(F.relu(_bn(ref, block.bn2)))
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref + block.downsample(x))  # shortcut takes the raw input
    assert isinstance(block.downsample, nn.Conv2d)  # no BN on the pre-activation projection
    identity_block = PreActBasicBlock(16, 16).eval()
    with torch.no_grad():
        out = identity_block(x)
        torch.testing.assert_close(out - x, identity_block.conv2(F.relu(identity_block.bn2(
            identity_block.conv1(F.relu(identity_block.bn1(x)))))))


@pytest.mark.parametrize('name, slots', [
    ('cifar_resnet20', ('drop_block',)), ('cifar_preresnet20', ('drop_block1', 'drop_block2'))])
def test_drop_block_only_in_last_stage(name, slots):
    model = _create(name, drop_block_rate=0.3)
    for stage_idx, stage in enumerate(model.stages):
        for block in stage:
            for slot in slots:
                layer = getattr(block, slot)
                if stage_idx == 2:
                    assert isinstance(layer, DropBlock2d)
                    assert layer.drop_prob == 0.3 and layer.block_size == 6
                else:
                    assert isinstance(layer, nn.Identity)
    assert _create(name, drop_block_rate=0.3, drop_block_size=3).stages[2][0].get_submodule(slots[0]).block_size == 3


def test_drop_path_linear_decay():
    model = _create('cifar_resnet20', drop_path_rate=0.2)
    blocks = [b for stage in model.stages for b in stage]
    assert isinstance(blocks[0].drop_path, nn.Identity)
    probs = [b.drop_path.drop_prob for b in blocks[1:]]
    assert all(isinstance(b.drop_path, DropPath) for b in blocks[1:])
    assert probs == pytest.approx([0.2 * i / 8 for i in range(1, 9)])


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_preresnet20'])
@pytest.mark.parametrize('kwargs', [dict(drop_rate=0.5), dict(drop_block_rate=0.3), dict(drop_path_rate=0.5)])
def test_regularizers_act_in_train_mode_only(name, kwargs):
    plain, reg = _create(name), _create(name, seed=1, **kwargs)
    reg.load_state_dict(plain.state_dict())  # regularizers add no parameters or buffers
    x = _x(batch=4)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), reg.eval()(x))
        torch.manual_seed(0)
        assert not torch.allclose(plain.train()(x), reg.train()(x))


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_preresnet20'])
def test_train_step_decreases_loss(name):
    model = _create(name).train()
    x, y = _x(batch=8), torch.arange(8) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_grad_checkpointing_same_output():
    model = _create('cifar_resnet20').eval()
    x = _x()
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), ref)


def test_group_matcher_orders_stem_stages_head():
    # timm's layer-wise LR decay groups: stem, one group per stage (the final norm joins the last), head
    model = _create('cifar_preresnet20')
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert sorted(groups) == [0, 1, 2, 3, 4]
    assert groups[0] == ['stem.conv.weight']
    for i in range(3):
        assert all(n.startswith(f'stages.{i}.') for n in groups[i + 1] if not n.startswith('norm'))
    assert 'norm.weight' in groups[3] and groups[4] == ['fc.weight', 'fc.bias']
    fine = timm.models.group_parameters(model, model.group_matcher(coarse=False))
    assert len(fine) == 1 + 9 + 1  # stem, 9 blocks (+ norm), head


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_preresnet20'])
def test_state_dict_round_trip(name):
    src, dst = _create(name, seed=0).eval(), _create(name, seed=1).eval()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(src(_x()), dst(_x()))


@pytest.mark.parametrize('kwargs, match', [
    (dict(depth=21), 'depth must be 6n \\+ 2'),
    (dict(depth=2), 'depth must be 6n \\+ 2'),
    (dict(drop_rate=1.0), 'drop_rate must be in \\[0, 1\\), got 1.0'),
    (dict(drop_path_rate=-0.1), 'drop_path_rate'),
    (dict(drop_block_rate=2), 'drop_block_rate'),
    (dict(drop_block_size=0), 'drop_block_size must be a positive int, got 0'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CifarResNet(**kwargs)
