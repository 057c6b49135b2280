"""Injection into built models: apply/remove, settings, SyncBatchNorm, EMA copies, FX, describe."""
import copy
import warnings

import pytest
import timm
import torch
import torch.nn as nn

import timm_fmd
from timm_fmd import FMDSettings, apply_fmd, describe, fmd_ops, oversized_blocks, reapply_fmd, remove_fmd
from timm_fmd.ops.distortion import BlockFeatureMapDistortion, FeatureMapDistortion


def _resnet(**fmd):
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=4)
    return apply_fmd(model, input_size=(3, 64, 64), **fmd)


def _train_step_hits_every_op(model, x):
    model.train()
    model(x).sum().backward()
    return all(op.last_fraction is not None for _, op in fmd_ops(model))


def test_apply_and_remove_round_trip():
    torch.manual_seed(0)
    plain = timm.create_model('resnet18', num_classes=4)
    model = copy.deepcopy(plain)
    apply_fmd(model, prob=0.1, block_size=3, input_size=(3, 64, 64))
    ops = fmd_ops(model)
    assert len(ops) == 14 and model.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 64, 64)
    plain.eval(), model.eval()
    assert torch.equal(model(x), plain(x))
    assert _train_step_hits_every_op(model, x)
    with pytest.raises(ValueError, match='model already has FMD; call timm_fmd.remove_fmd'):
        apply_fmd(model)
    remove_fmd(model)
    assert fmd_ops(model) == [] and timm_fmd.fmd_settings(model) is None
    assert not any(m._forward_hooks for m in model.modules()) and not model._forward_pre_hooks
    assert isinstance(model.layer3[0].drop_block, nn.Identity)
    torch.manual_seed(1)
    a = model.train()(x)
    torch.manual_seed(1)
    assert torch.equal(a, plain.train()(x))
    with pytest.raises(ValueError, match='model has no FMD to remove'):
        remove_fmd(model)


def test_settings_reach_the_ops():
    model = _resnet(prob=0.08, block_size=5, stages=(-2, -1), stage_scale=(0.25, 1.0), gamma=3.0, lam=0.1,
                    steps=2, mode='exact', shared_mask=True, ramp_steps=100)
    for path, op in fmd_ops(model):
        assert isinstance(op, BlockFeatureMapDistortion)
        assert op.prob == pytest.approx(0.02 if path.startswith('layer3') else 0.08)
        assert (op.block_size, op.shared_mask, op.gamma, op.lam, op.steps, op.mode, op.ramp.steps) == \
            (5, True, 3.0, 0.1, 2, 'exact', 100)
    elem = _resnet(block_size=None, sites=('skip',))
    assert all(type(op) is FeatureMapDistortion and op.site.kind == 'skip' for _, op in fmd_ops(elem))


@pytest.mark.parametrize('kwargs,exc,match', [
    (dict(prob=1.0), ValueError, r'fmd_prob must be in \[0, 1\), got 1.0'),
    (dict(block_size=-2), ValueError, 'fmd_block_size must be an int >= 1, got -2'),
    (dict(stages=()), ValueError, 'fmd_stages must name at least one'),
    (dict(stages=(1.5,)), TypeError, 'fmd_stages must be an int or a sequence of ints'),
    (dict(sites=('conv', 'norm')), ValueError, r"fmd_sites must be one of \('conv', 'skip'\), got 'norm'"),
    (dict(gamma=-1.0), ValueError, 'fmd_gamma must be a finite float >= 0'),
    (dict(mode='fast'), ValueError, 'fmd_mode must be one of'),
    (dict(stage_scale=(1.0,)), ValueError, r'fmd_stage_scale needs one multiplier per stage in fmd_stages=\(-2, -1\)'),
    (dict(prob=0.5, stage_scale=(1.0, 2.5)), ValueError, r'fmd_prob \* fmd_stage_scale must be in \[0, 1\)'),
    (dict(ramp_steps=-1), ValueError, 'fmd_ramp_steps must be an int >= 0'),
    (dict(shared_mask='no'), TypeError, 'fmd_shared_mask must be a bool'),
])
def test_bad_settings_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FMDSettings(**kwargs)


def test_settings_kwargs_round_trip_and_unknown_names():
    s = FMDSettings(prob=0.07, stages=[-2, -1], stage_scale=[0.25, 1.0])
    assert FMDSettings.from_kwargs(s.to_kwargs()) == s
    assert s.to_kwargs()['fmd_stages'] == [-2, -1]  # JSON-friendly
    with pytest.raises(ValueError, match=r"unknown FMD argument 'fmd_probability'; accepted: \['fmd_block_size'"):
        FMDSettings.from_kwargs({'fmd_probability': 0.1})


@pytest.mark.parametrize('convert', ['timm', 'torch'])
def test_sync_batchnorm_conversion_keeps_fmd(convert):
    """The conversion keeps children (slots, 'fmd' children) but drops hooks: the next training forward
    re-installs them, silently (FMD followed the change), and every op runs."""
    from timm.layers import convert_sync_batchnorm
    model = _resnet(prob=0.1, block_size=3)
    model = convert_sync_batchnorm(model) if convert == 'timm' else nn.SyncBatchNorm.convert_sync_batchnorm(model)
    hosts = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm) and 'fmd' in m._modules]
    assert len(hosts) == 6 and not any(m._forward_hooks for m in hosts)  # bn1 x 4, downsample x 2
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert _train_step_hits_every_op(model, torch.randn(2, 3, 64, 64))
    assert all(len(m._forward_hooks) == 1 for m in hosts) and len(fmd_ops(model)) == 14
    assert reapply_fmd(model) == 0  # repaired once, nothing left to do


def test_ema_copy_links_its_own_layers():
    from timm.utils import ModelEmaV3
    model = _resnet(prob=0.1, block_size=3, mode='exact')
    ema = ModelEmaV3(model, decay=0.9)
    ops, ema_ops = dict(fmd_ops(model)), dict(fmd_ops(ema.module))
    ema_modules = dict(ema.module.named_modules())
    for path, op in ema_ops.items():
        if op.next_layer is not None:
            assert op.next_layer is ema_modules[op.site.next_layer] and op.next_layer is not ops[path].next_layer
    x = torch.randn(2, 3, 64, 64)
    ema.module.eval(), model.eval()
    assert torch.equal(ema.module(x), model(x))
    assert _train_step_hits_every_op(ema.module, x)


def test_fx_feature_extraction_treats_the_op_as_a_leaf():
    from timm.models import create_feature_extractor
    model = timm.create_model('fmd_resnet18', fmd_input_size=(3, 64, 64), fmd_block_size=3)
    extractor = create_feature_extractor(model, return_nodes=['layer3.0.drop_block', 'layer4'])
    assert any(isinstance(m, BlockFeatureMapDistortion) for m in extractor.modules())
    extractor.eval()
    feats = extractor(torch.randn(1, 3, 64, 64))
    assert feats['layer4'].shape == (1, 512, 2, 2)


def test_features_only_model():
    model = timm.create_model('fmd_resnet18', features_only=True, out_indices=(3, 4), fmd_input_size=(3, 64, 64))
    assert len(fmd_ops(model)) > 0
    model.eval()
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [256, 512]


def test_describe_shows_every_site():
    model = _resnet(prob=0.1, block_size=7)
    text = describe(model)
    lines = text.splitlines()
    assert lines[0].startswith('ResNet: 14 FMD sites at input (3, 64, 64)')
    assert 'layer3.0.drop_block' in text and 'layer3.0.conv2' in text and '(none: w=0.01)' in text
    assert len(lines) == 3 + 14 + 1
    assert lines[-1].startswith('expected: the fraction of the map')
    assert 'last: the fraction it distorted in its last training forward (- before the first)' in lines[-1]
    big = describe(model, input_size=(3, 224, 224))
    assert '256x14x14' in big and '256x4x4' in text
    model.train()(torch.randn(4, 3, 64, 64))
    assert describe(model).splitlines()[3].split()[7] != '-'  # the 'last' column now has a measured value
    assert describe(timm.create_model('resnet18')) == 'ResNet: no FMD sites (FMD is OFF)'
    # a wrapper (DistributedDataParallel, an EMA holder) is described through the model it wraps
    wrapped = describe(nn.ModuleDict({'module': model}))
    assert wrapped.splitlines()[0].startswith('ModuleDict: 14 FMD sites at input (3, 64, 64)')
    assert 'module.layer3.0.drop_block' in wrapped and 'gamma=1.0' in wrapped


def test_oversized_blocks_are_reported_at_the_training_input_size():
    model = _resnet(prob=0.1, block_size=7)  # layer3 and layer4 of ResNet-18
    assert oversized_blocks(model, (3, 64, 64)) == [
        'FMD block size 7 exceeds the 4x4 feature maps of 7 site(s) (layer3.0.drop_block, ...) at input (3, 64, 64): '
        'clamped to 4x4 there; --fmd-block-size 4 or less fits them',
        'FMD block size 7 exceeds the 2x2 feature maps of 7 site(s) (layer4.0.drop_block, ...) at input (3, 64, 64): '
        'clamped to 2x2 there; --fmd-block-size 2 or less fits them']
    assert oversized_blocks(model, (3, 224, 224)) == []  # 14x14 and 7x7 maps hold a 7x7 block
    assert oversized_blocks(timm.create_model('resnet18'), (3, 64, 64)) == []


def test_apply_reports_missing_sites():
    model = timm.create_model('vgg11')
    with pytest.raises(ValueError, match=r"no FMD site \(conv/skip\) found in stages \(-1,\) = \{5: 'features.20'\}"):
        apply_fmd(model, stages=(-1,), input_size=(3, 64, 64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        apply_fmd(model, stages=(-2, -1), input_size=(3, 64, 64))
    assert any("no site in feature_info stage(s) ['features.20']" in str(w.message) for w in caught)
