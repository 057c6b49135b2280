"""FMD on timm's zoo: 60 architectures of ~30 families, at a small input.

For each: sites are found in the chosen stages, a training-mode forward and backward runs and
passes through every site, the eval-mode output equals the base model's bit for bit, and the
state_dict is the base architecture's (strict loading both ways). Token models get element-wise
FMD on their block outputs; models with a 2-D token grid (Swin) get block FMD on it.
"""
import warnings

import pytest
import timm
import torch

import timm_fmd  # noqa: F401  (registers the fmd_ twins)
from timm_fmd import fmd_ops

# (arch, input side, stages); fixed-size models are built with img_size=side
ARCHS = [
    ('resnet10t', 64, (-2, -1)), ('resnet18d', 64, (-2, -1)), ('resnetv2_50', 64, (-2, -1)),
    ('resnext26ts', 64, (-2, -1)), ('seresnet18', 64, (-2, -1)), ('res2net50_14w_8s', 64, (-2, -1)),
    ('resnest14d', 64, (-2, -1)), ('skresnet18', 64, (-2, -1)), ('regnetx_002', 64, (-2, -1)),
    ('regnety_002', 64, (-2, -1)), ('regnetz_b16', 64, (-2, -1)), ('efficientnet_b0', 64, (-2, -1)),
    ('tf_efficientnet_b0', 64, (-2, -1)), ('efficientnet_lite0', 64, (-2, -1)), ('mixnet_s', 64, (-2, -1)),
    ('mobilenetv3_small_050', 64, (-2, -1)), ('mobilenetv4_conv_small', 64, (-2, -1)), ('mnasnet_050', 64, (-2, -1)),
    ('fbnetc_100', 64, (-2, -1)), ('hardcorenas_a', 64, (-2, -1)), ('tinynet_e', 64, (-2, -1)),
    ('lcnet_050', 64, (-2, -1)), ('ghostnet_050', 64, (-2, -1)), ('ghostnetv2_100', 64, (-2, -1)),
    ('repghostnet_050', 64, (-2, -1)), ('rexnet_100', 64, (-2, -1)), ('convnext_atto', 64, (-2, -1)),
    ('convnextv2_atto', 64, (-2, -1)), ('densenet121', 64, (-2, -1)), ('cspresnet50', 64, (-2, -1)),
    ('cs3darknet_s', 64, (-2, -1)), ('dla46_c', 64, (-2, -1)), ('dpn68', 64, (-2, -1)), ('vgg11', 64, (-3, -2)),
    ('repvgg_a0', 64, (-2, -1)), ('gernet_s', 64, (-2, -1)), ('hrnet_w18_small', 64, (-2, -1)),
    ('nf_regnet_b0', 64, (-2, -1)), ('ese_vovnet19b_dw', 64, (-2, -1)), ('hgnetv2_b0', 64, (-2, -1)),
    ('starnet_s1', 64, (-2, -1)), ('efficientvit_b0', 64, (-2, -1)), ('fastvit_t8', 64, (-2, -1)),
    ('mobilevit_xxs', 64, (-2, -1)), ('edgenext_xx_small', 64, (-2, -1)), ('poolformer_s12', 64, (-2, -1)),
    ('mambaout_femto', 64, (-2, -1)), ('pvt_v2_b0', 64, (-2, -1)), ('botnet26t_256', 64, (-2, -1)),
    ('coatnet_nano_rw_224', 64, (-2, -1)), ('maxvit_nano_rw_256', 64, (-2, -1)), ('inception_v3', 96, (-2, -1)),
    ('vit_tiny_patch16_224', 64, (-2, -1)), ('deit_tiny_patch16_224', 64, (-2, -1)), ('cait_xxs24_224', 64, (-2, -1)),
    ('xcit_nano_12_p16_224', 64, (-2, -1)), ('eva02_tiny_patch14_224', 64, (-2, -1)), ('convit_tiny', 64, (-2, -1)),
    ('swin_tiny_patch4_window7_224', 64, (-2, -1)), ('mixer_s32_224', 64, (-2, -1)),
]
# smaller pre-logits for VGG (a 512x4096x7x7 conv, 100M weights to initialise, otherwise): its sites are in its
# features either way
EXTRA = {'vgg11': dict(mlp_ratio=0.01)}


def test_at_least_forty_architectures():
    assert len(ARCHS) >= 40


@pytest.mark.parametrize('arch,side,stages', ARCHS, ids=[a for a, _, _ in ARCHS])
def test_fmd_on_architecture(arch, side, stages):
    kwargs = {'num_classes': 5, **EXTRA.get(arch, {})}
    if timm.models.get_pretrained_cfg(arch).fixed_input_size:
        kwargs['img_size'] = side
    torch.manual_seed(0)
    base = timm.create_model(arch, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # a chosen stage without sites warns
        model = timm.create_model('fmd_' + arch, fmd_prob=0.1, fmd_stages=stages, fmd_input_size=(3, side, side),
                                  **kwargs)
    assert model.state_dict().keys() == base.state_dict().keys()
    model.load_state_dict(base.state_dict(), strict=True)
    base.load_state_dict(model.state_dict(), strict=True)

    ops = fmd_ops(model)
    chosen = {s % len(model.feature_info) for s in stages}
    assert ops and {op.site.stage for _, op in ops} <= chosen
    for _, op in ops:
        block = op.site.layout in ('NCHW', 'NHWC')
        assert (op.block_size is not None) == block  # block FMD on 2-D maps, element-wise on tokens/vectors

    x = torch.randn(2, 3, side, side)
    base.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    model.train()
    out = model(x)
    out.float().pow(2).mean().backward()
    assert all(op.last_fraction is not None for _, op in ops), 'a site was not reached in training'
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
