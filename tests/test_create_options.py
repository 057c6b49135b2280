"""timm's own ways to build a model work on fmd_<arch> as on <arch>, with FMD at the chosen stages.

One architecture of every family (timm model module) of tests/test_coverage.py, each option on each
of them, grouped into two builds (not the full cross product of options):

* ``features_only`` with ``out_indices`` (the FMD stages) and ``in_chans=1``;
* ``num_classes=0``, ``global_pool=''`` (where the base model supports it), ``drop_rate``,
  ``drop_path_rate`` / ``drop_block_rate`` (where it takes them), ``scriptable``, ``img_size`` for
  fixed-size models (and then no ``fmd_input_size``: the probe must find the size itself), and
  ``checkpoint_path``; then ``pretrained`` from that checkpoint (``pretrained_cfg_overlay=dict(file=...)``)
  with ``num_classes=3`` and ``exportable``.

Each asserts exact values: the site count per stage and kind, the state_dict keys, the outputs of
the base model built with the same arguments (bit for bit in eval mode, so also their shapes), and
that a training forward and backward runs every site.
"""
import warnings

import pytest
import timm
import torch

import timm_fmd  # noqa: F401  (registers the fmd_ twins)
from timm_fmd import describe, fmd_ops, remove_fmd
from test_coverage import EXTRA

# (arch, input side, fmd_stages, number of feature_info stages, what the base model accepts:
#  p = drop_path_rate, b = drop_block_rate, g = global_pool='' with num_classes=0,
#  {stage: (conv sites, skip sites)} -- the sites of fmd_<arch> built with no option)
FAMILIES = [
    ('resnet10t', 64, (-2, -1), 5, 'pbg', {3: (3, 1), 4: (3, 1)}),
    ('resnetv2_18', 64, (-2, -1), 5, 'pg', {3: (5, 2), 4: (5, 2)}),
    ('gernet_s', 64, (-2, -1), 5, 'pbg', {3: (22, 7), 4: (12, 3)}),
    ('res2net50_14w_8s', 64, (-2, -1), 5, 'pbg', {3: (55, 6), 4: (28, 3)}),
    ('resnest14d', 64, (-2, -1), 5, 'pbg', {3: (6, 1), 4: (6, 1)}),
    ('skresnet18', 64, (-2, -1), 5, 'pbg', {3: (11, 2), 4: (11, 2)}),
    ('regnetx_002', 64, (-2, -1), 5, 'pg', {3: (13, 4), 4: (22, 7)}),
    ('tinynet_e', 64, (-2, -1), 5, 'pg', {3: (12, 2), 4: (9, 1)}),
    ('mobilenetv3_small_050', 64, (-2, -1), 5, 'pg', {3: (15, 4), 4: (10, 2)}),
    ('hardcorenas_a', 64, (-2, -1), 5, 'pg', {3: (12, 2), 4: (7, 1)}),
    ('ghostnet_050', 64, (-2, -1), 5, 'g', {3: (11, 2), 4: (29, 6)}),
    ('repghostnet_050', 64, (-2, -1), 5, 'g', {3: (11, 6), 4: (29, 18)}),
    ('rexnet_100', 64, (-2, -1), 5, 'pg', {3: (18, 5), 4: (15, 4)}),
    ('convnext_atto', 64, (-2, -1), 4, 'pg', {2: (19, 6), 3: (7, 2)}),
    ('densenet121', 64, (-2, -1), 5, 'g', {3: (49, 0), 4: (33, 0)}),
    ('cs3darknet_s', 64, (-2, -1), 5, 'pg', {3: (11, 4), 4: (5, 1)}),
    ('dla46_c', 64, (-2, -1), 6, 'g', {4: (15, 4), 5: (8, 2)}),
    ('dpn68', 64, (-2, -1), 5, 'g', {3: (37, 0), 4: (10, 0)}),
    ('vgg11', 64, (-3, -2), 6, 'g', {3: (2, 0), 4: (2, 0)}),  # built with mlp_ratio=0.01 (see EXTRA)
    ('hrnet_w18_small', 64, (-2, -1), 5, 'g', {3: (20, 6), 4: (33, 8)}),
    ('nf_regnet_b0', 64, (-2, -1), 5, 'pg', {3: (19, 6), 4: (20, 6)}),  # 4: final_conv's site, its final_act
    ('ese_vovnet19b_dw', 64, (-2, -1), 5, 'pg', {3: (8, 0), 4: (8, 0)}),
    ('hgnetv2_b0', 64, (-2, -1), 4, 'pg', {2: (17, 1), 3: (9, 0)}),
    ('starnet_s1', 64, (-2, -1), 4, 'pg', {2: (41, 8), 3: (16, 3)}),
    ('efficientvit_b0', 64, (-2, -1), 4, '', {2: (17, 4), 3: (17, 4)}),
    ('fastvit_t8', 64, (-2, -1), 4, 'pg', {2: (23, 13), 3: (13, 7)}),
    ('mobilevit_xxs', 64, (-2, -1), 5, 'pbg', {3: (7, 4), 4: (8, 3)}),
    ('edgenext_xx_small', 64, (-2, -1), 4, 'pg', {2: (8, 6), 3: (5, 2)}),
    ('poolformer_s12', 64, (-2, -1), 4, 'pg', {2: (13, 8), 3: (5, 4)}),
    ('mambaout_femto', 64, (-2, -1), 4, 'pg', {2: (10, 9), 3: (4, 3)}),
    ('pvt_v2_b0', 64, (-2, -1), 4, 'pg', {2: (5, 2), 3: (3, 2)}),
    ('botnet26t_256', 64, (-2, -1), 5, 'pbg', {3: (7, 3), 4: (7, 4)}),
    ('coatnet_nano_rw_224', 64, (-2, -1), 5, 'pg', {3: (25, 6), 4: (13, 3)}),
    ('inception_v3', 96, (-2, -1), 5, 'g', {3: (44, 0), 4: (24, 0)}),
    ('vit_tiny_patch16_224', 64, (-2, -1), 12, 'pg', {10: (0, 1), 11: (0, 1)}),
    ('deit_tiny_patch16_224', 64, (-2, -1), 12, 'pg', {10: (0, 1), 11: (0, 1)}),
    ('cait_xxs24_224', 64, (-2, -1), 24, 'pg', {22: (0, 1), 23: (0, 1)}),
    ('xcit_nano_12_p16_224', 64, (-2, -1), 12, 'pg', {10: (2, 1), 11: (2, 1)}),
    ('eva02_tiny_patch14_224', 64, (-2, -1), 12, 'pg', {10: (0, 1), 11: (0, 1)}),
    ('convit_tiny', 64, (-2, -1), 12, 'pg', {10: (0, 1), 11: (0, 1)}),
    ('swin_tiny_patch4_window7_224', 64, (-2, -1), 4, 'pg', {2: (0, 6), 3: (0, 2)}),
    ('mixer_s32_224', 64, (-2, -1), 8, 'pg', {6: (0, 1), 7: (0, 1)}),
]
IDS = [f[0] for f in FAMILIES]


def _counts(model):
    counts = {}
    for _, op in fmd_ops(model):
        conv, skip = counts.get(op.site.stage, (0, 0))
        counts[op.site.stage] = (conv + (op.site.kind == 'conv'), skip + (op.site.kind == 'skip'))
    return counts


def _build(name, seed, **kwargs):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # timm's notes on unused pretrained keys and the like
        return timm.create_model(name, **kwargs)


def _outputs(out):
    """A model's outputs as a list: a tensor, a list of feature maps or a dict of them."""
    out = list(out.values()) if isinstance(out, dict) else out
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _eval(model, x):
    model.eval()
    with torch.no_grad():
        return _outputs(model(x))


def _trains_through_every_site(model, x):
    model.train()
    sum(o.float().pow(2).mean() for o in _outputs(model(x))).backward()
    return all(op.last_fraction is not None for _, op in fmd_ops(model))


def _size_kwargs(arch, side, channels=3):
    """img_size for fixed-size models (the probe must find it), else the probe size as fmd_input_size."""
    if timm.models.get_pretrained_cfg(arch).fixed_input_size:
        return {'img_size': side}, {}
    return {}, {'fmd_input_size': (channels, side, side)}


@pytest.mark.parametrize('arch,side,stages,n_stages,accepts,counts', FAMILIES, ids=IDS)
def test_features_only(arch, side, stages, n_stages, accepts, counts):
    size, probe = _size_kwargs(arch, side, channels=1)
    kwargs = dict(features_only=True, out_indices=tuple(s % n_stages for s in stages), in_chans=1, **size,
                  **EXTRA.get(arch, {}))
    base = _build(arch, 0, **kwargs)
    model = _build('fmd_' + arch, 1, fmd_stages=stages, **probe, **kwargs)
    assert type(model) is type(base) and model.state_dict().keys() == base.state_dict().keys()
    assert _counts(model) == counts
    model.load_state_dict(base.state_dict())
    x = torch.randn(2, 1, side, side)
    ours, theirs = _eval(model, x), _eval(base, x)
    assert len(ours) == len(stages) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert _trains_through_every_site(model, x)


@pytest.mark.parametrize('arch,side,stages,n_stages,accepts,counts', FAMILIES, ids=IDS)
def test_build_options(arch, side, stages, n_stages, accepts, counts, tmp_path):
    size, probe = _size_kwargs(arch, side)
    extra = EXTRA.get(arch, {})
    kwargs = dict(num_classes=0, drop_rate=0.1, scriptable=True, **size, **extra)
    kwargs.update({'drop_path_rate': 0.1} if 'p' in accepts else {})
    kwargs.update({'drop_block_rate': 0.1} if 'b' in accepts else {})
    kwargs.update({'global_pool': ''} if 'g' in accepts else {})
    base = _build(arch, 0, **kwargs)
    checkpoint = tmp_path / 'base.pth'
    torch.save(base.state_dict(), checkpoint)
    model = _build('fmd_' + arch, 1, fmd_stages=stages, checkpoint_path=str(checkpoint), **probe, **kwargs)
    assert model.state_dict().keys() == base.state_dict().keys() and model.num_classes == 0
    assert _counts(model) == counts
    x = torch.randn(2, 3, side, side)
    assert torch.equal(_eval(model, x)[0], _eval(base, x)[0])  # the checkpoint's weights, the base's output
    assert _trains_through_every_site(model, x)

    # pretrained weights from a file (a plain model without classifier), another number of classes, for export
    source = _build(arch, 2, num_classes=0, **size, **extra).state_dict()
    torch.save(source, checkpoint)
    tuned = _build('fmd_' + arch, 3, pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)),
                   num_classes=3, exportable=True, fmd_stages=stages, **probe, **size, **extra)
    assert tuned.num_classes == 3 and _counts(tuned) == counts
    weights = tuned.state_dict()
    assert {k for k, v in weights.items() if k in source and torch.equal(v, source[k])} == source.keys()
    classifier = tuned.pretrained_cfg['classifier']
    new = weights.keys() - source.keys()  # the new classifier is the only part not from the file
    assert new and all(k.startswith(tuple(c + '.' for c in ([classifier] if isinstance(classifier, str)
                                                                else classifier))) for k in new)
    assert _eval(tuned, x)[0].shape == (2, 3)


@pytest.mark.parametrize('feature_cls', ['list', 'dict', 'hook', 'fx'])
def test_every_feature_wrapper_keeps_the_sites(feature_cls):
    """timm's feature wrappers rename (list/dict flatten stages.2 to stages_2), hold the model as a child
    (hook without rewrite) or trace it (fx: FMD goes in before tracing, its ops become graph nodes)."""
    kwargs = dict(features_only=True, feature_cls=feature_cls, out_indices=(2, 3))
    base = _build('convnext_atto', 0, **kwargs)
    model = _build('fmd_convnext_atto', 1, fmd_input_size=(3, 64, 64), **kwargs)
    assert type(model) is type(base) and _counts(model) == {2: (19, 6), 3: (7, 2)}
    model.load_state_dict(base.state_dict())
    x = torch.randn(2, 3, 64, 64)
    ours, theirs = _eval(model, x), _eval(base, x)
    assert [o.shape for o in ours] == [(2, 160, 4, 4), (2, 320, 2, 2)]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert _trains_through_every_site(model, x)
    if feature_cls == 'fx':
        with pytest.raises(ValueError, match='FMD is traced into this FeatureGraphNet'):
            remove_fmd(model)


def test_features_only_reports_stages_its_out_indices_cut_off():
    with pytest.warns(UserWarning, match=r"FMD: no site in feature_info stage\(s\) \['layer4'\]: they are not in "
                                         r"this FeatureListNet \(a features_only model ends at its last out_indices"):
        model = timm.create_model('fmd_resnet18', features_only=True, out_indices=(1, 2, 3), fmd_input_size=(3, 64, 64))
    assert _counts(model) == {3: (5, 2)}
    with pytest.raises(ValueError, match=r"no FMD site \(conv/skip\) found in stages \(-2, -1\) = "
                                         r"\{3: 'layer3', 4: 'layer4'\} of FeatureListNet \(stage\(s\) "
                                         r"\['layer3', 'layer4'\] are cut"):
        _build('fmd_resnet18', 0, features_only=True, out_indices=(1, 2), fmd_input_size=(3, 64, 64))
    assert _counts(_build('fmd_resnet18', 0, features_only=True, out_indices=(1, 2), fmd_stages=(1, 2),
                          fmd_input_size=(3, 64, 64))) == {1: (4, 2), 2: (5, 2)}


def test_probe_runs_at_the_size_the_model_was_built_for():
    """img_size and in_chans change the model, not its pretrained cfg: the probe asks timm's input config."""
    model = _build('fmd_coatnet_nano_rw_224', 0, img_size=64)
    assert describe(model).startswith('MaxxVit: 47 FMD sites at input (3, 64, 64)')
    assert fmd_ops(model)[-1][1].site.shape == (1, 512, 2, 2)
    gray = _build('fmd_resnet10t', 0, in_chans=1)
    assert describe(gray).startswith('ResNet: 8 FMD sites at input (1, 176, 176)')  # resnet10t's cfg size


def test_drop_block_rate_and_fmd_run_together():
    """timm's DropBlock takes ResNet's drop_block slot; FMD then hooks the norm before it, so both run."""
    from timm.layers import DropBlock2d
    model = _build('fmd_resnet18', 0, drop_block_rate=0.1, fmd_block_size=3, fmd_input_size=(3, 64, 64))
    blocks = [m for m in model.modules() if isinstance(m, DropBlock2d)]
    assert len(blocks) == 4 and _counts(model) == {3: (5, 2), 4: (5, 2)}
    assert {p for p, _ in fmd_ops(model) if p.endswith('bn2.fmd')} == {
        'layer3.0.bn2.fmd', 'layer3.1.bn2.fmd', 'layer4.0.bn2.fmd', 'layer4.1.bn2.fmd'}
    calls = []
    for b in blocks:
        b.register_forward_hook(lambda m, a, out: calls.append(m.training))
    assert _trains_through_every_site(model, torch.randn(2, 3, 64, 64))
    assert calls == [True] * 4


def test_every_family_is_in_the_sweep():
    from timm.models import model_entrypoint
    from test_coverage import ARCHS
    family = lambda arch: model_entrypoint(arch).__module__  # noqa: E731
    assert {family(a) for a, _, _ in ARCHS} == {family(a) for a in IDS}
