"""Site discovery: where conv and skip sites land and what they link to, on known architectures."""
import pytest
import timm
import torch
import torch.nn as nn

import timm_fmd  # noqa: F401  (registers the paper models)
from timm_fmd.sites import find_sites


def _by_path(sites):
    return {s.path: s for s in sites}


def test_resnet50_sites_and_links():
    model = timm.create_model('resnet50')
    sites = _by_path(find_sites(model, (-2, -1), input_size=(3, 64, 64)))
    assert {s.stage for s in sites.values()} == {3, 4}  # layer3, layer4 in feature_info
    assert all(p.startswith(('layer3.', 'layer4.')) for p in sites)
    # Bottleneck: bn1 (hook), bn2 -> timm's drop_block slot, bn3 (hook), the projection's BN, the block output
    first = {p: (s.kind, s.slot, s.next_layer) for p, s in sites.items() if p.startswith('layer3.0')}
    assert first == {
        'layer3.0.bn1': ('conv', False, 'layer3.0.conv2'),
        'layer3.0.drop_block': ('conv', True, 'layer3.0.conv3'),
        'layer3.0.bn3': ('conv', False, 'layer3.1.conv1'),
        'layer3.0.downsample.1': ('conv', False, 'layer3.1.conv1'),
        'layer3.0': ('skip', False, 'layer3.1.conv1'),
    }
    assert sites['layer3.5'].next_layer == 'layer4.0.conv1'  # into the next stage's first conv
    assert sites['layer4.2'].next_layer is None  # then global pooling: no next layer
    assert sites['layer4.2'].shape == (1, 2048, 2, 2) and sites['layer4.2'].layout == 'NCHW'
    assert len(find_sites(model, (-1,), kinds=('skip',), input_size=(3, 64, 64))) == 3


def test_fused_norm_act_slot_and_no_se_gate_sites():
    model = timm.create_model('efficientnet_b0')
    sites = find_sites(model, (-1,), input_size=(3, 64, 64))
    assert any(s.path == 'blocks.6.0.bn1.drop' and s.slot for s in sites)  # BatchNormAct2d.drop
    assert not any('.se.' in s.path for s in sites)  # squeeze-excitation gates are not feature maps


def test_paper_cnn_fc_sites():
    sites = find_sites(timm.create_model('paper_cnn'), (-2, -1))
    assert [(s.path, s.layout, s.shape, s.next_layer) for s in sites] == [
        ('fc_stages.0.act', 'NC', (1, 2048), 'fc_stages.1.fc'),
        ('fc_stages.1.act', 'NC', (1, 2048), 'fc'),
    ]


def test_token_and_channels_last_layouts():
    vit = find_sites(timm.create_model('vit_tiny_patch16_224', img_size=64), (-2, -1))
    assert [(s.path, s.kind, s.layout, s.next_layer) for s in vit] == [
        ('blocks.10', 'skip', 'NLC', 'blocks.11.attn.qkv'), ('blocks.11', 'skip', 'NLC', None)]
    swin = find_sites(timm.create_model('swin_tiny_patch4_window7_224', img_size=64), (-1,))
    assert swin and all(s.layout == 'NHWC' for s in swin)
    convnext = find_sites(timm.create_model('convnext_atto', conv_mlp=False), (-1,), input_size=(3, 64, 64))
    norm = next(s for s in convnext if s.path.endswith('blocks.0.norm'))
    assert norm.layout == 'NHWC' and norm.next_layer.endswith('blocks.0.mlp.fc1')


def test_flat_sequential_stages_use_execution_spans():
    """VGG's feature_info names single layers of one Sequential: the stage is the span up to that layer."""
    sites = find_sites(timm.create_model('vgg11'), (-3, -2), input_size=(3, 64, 64))
    assert [(s.path, s.stage) for s in sites] == [('features.12', 3), ('features.14', 3),
                                                   ('features.17', 4), ('features.19', 4)]


class _Shared(nn.Module):
    """A toy net reusing one activation module: a module that runs twice cannot host a site."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 2)
        self.feature_info = [dict(module='conv1', num_chs=8, reduction=1), dict(module='conv2', num_chs=8, reduction=1)]

    def forward(self, x):
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.head(x.mean((2, 3)))


def test_reused_module_is_not_a_site():
    sites = find_sites(_Shared(), (0, 1), input_size=(3, 8, 8))
    assert [(s.path, s.next_layer) for s in sites] == [('conv1', 'conv2'), ('conv2', None)]


def test_stage_and_probe_errors_are_named():
    model = timm.create_model('resnet18')
    with pytest.raises(ValueError, match=r"stage index 5 is out of range: ResNet has 5 feature_info stages "
                                         r"\['act1', 'layer1', 'layer2', 'layer3', 'layer4'\]; use -5..4"):
        find_sites(model, (5,))
    with pytest.raises(ValueError, match=r'the probe forward that finds FMD sites failed for VisionTransformer at '
                                         r'input size \(3, 32, 32\).*fmd_input_size'):
        find_sites(timm.create_model('vit_tiny_patch16_224'), input_size=(3, 32, 32))
    with pytest.raises(ValueError, match='has no feature_info'):
        find_sites(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_probe_leaves_the_model_and_rng_untouched():
    model = timm.create_model('resnet18').train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    find_sites(model, input_size=(3, 32, 32))
    assert torch.equal(torch.rand(3), expected)  # global RNG state restored
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_preactivation_resnet_uses_its_slots_after_each_conv():
    """The empty slot a model put directly on a conv's output wins over the norm after it: in the
    pre-activation ResNet-56 that is where the FMD authors put their op (after each conv of the last stage)."""
    sites = find_sites(timm.create_model('cifar_preresnet56'), (-1,), kinds=('conv',))
    block = {s.path: (s.slot, s.next_layer) for s in sites if s.path.startswith('stages.2.1.')}
    assert block == {'stages.2.1.drop_block1': (True, 'stages.2.1.conv2'),
                     'stages.2.1.drop_block2': (True, 'stages.2.2.conv1')}
    assert [s.path for s in sites if not s.slot] == ['stages.2.0.downsample']  # the projection shortcut's conv


def test_feature_stages_resolve_through_timm_feature_wrappers():
    """Stage paths inside features_only models: flattened Sequentials (stages.2 -> stages_2), the model held
    as a child (FeatureGetterNet: model., FeatureHookNet without rewrite: body.), stages cut off: None."""
    from timm_fmd.stages import feature_stages
    assert feature_stages(timm.create_model('convnext_atto', features_only=True, out_indices=(1, 2))) == [
        'stages_0', 'stages_1', 'stages_2', None]
    assert feature_stages(timm.create_model('vit_tiny_patch16_224', features_only=True, out_indices=(1, 2)))[:4] == [
        'model.blocks.0', 'model.blocks.1', 'model.blocks.2', None]
    assert feature_stages(timm.create_model('resnet18', features_only=True, feature_cls='hook', out_indices=(1, 2))) == [
        'body.act1', 'body.layer1', 'body.layer2', 'body.layer3', 'body.layer4']
    assert feature_stages(timm.create_model('resnet18')) == ['act1', 'layer1', 'layer2', 'layer3', 'layer4']


def test_conv_site_belongs_to_its_convs_stage():
    """NF-RegNet's last feature module is final_conv; its activation comes after it and still is stage 4's site."""
    sites = find_sites(timm.create_model('nf_regnet_b0'), (-1,), kinds=('conv',), input_size=(3, 64, 64))
    assert (sites[-1].path, sites[-1].stage, sites[-1].next_layer) == ('final_act', 4, None)
    assert len(sites) == 20
