"""fmd_<arch> twins in timm's registry, timm_fmd.create_model, compile and export of FMD models."""
import pytest
import timm
import torch

import timm_fmd
from timm_fmd import fmd_ops


def test_every_architecture_has_a_twin_with_the_base_tags():
    archs = timm.list_models()
    twins = set(timm.list_models('fmd_*'))
    assert all('fmd_' + a in twins for a in archs if not a.startswith('fmd_'))
    assert {'fmd_resnet50', 'fmd_vit_base_patch16_224', 'fmd_cifar_resnet56', 'fmd_cifar_preresnet56',
            'fmd_paper_cnn'} <= twins
    tagged = timm.list_models('fmd_resnet50.*', pretrained=True)
    assert 'fmd_resnet50.a1_in1k' in tagged
    assert len(tagged) == len(timm.list_models('resnet50.*', pretrained=True))
    cfg = timm.models.get_pretrained_cfg('fmd_resnet50.a1_in1k')
    assert cfg.hf_hub_id == 'timm/resnet50.a1_in1k'  # the base's repository, not timm/fmd_resnet50...
    assert timm_fmd.register_fmd_models() == 0  # idempotent


def test_kwargs_split_between_fmd_and_the_base():
    model = timm.create_model('fmd_resnet18', num_classes=7, in_chans=1, drop_rate=0.3, drop_path_rate=0.1,
                              fmd_prob=0.05, fmd_stages=(-1,), fmd_input_size=(1, 64, 64))
    assert model.num_classes == 7 and model.conv1.in_channels == 1 and model.drop_rate == 0.3
    assert {op.site.stage for _, op in fmd_ops(model)} == {4}
    with pytest.raises(ValueError, match="unknown FMD argument 'fmd_gama'"):
        timm.create_model('fmd_resnet18', fmd_gama=1.0)
    with pytest.raises(ValueError, match=r'fmd_prob must be in \[0, 1\)'):
        timm.create_model('fmd_resnet18', fmd_prob=2)


def test_pretrained_weights_load_through_timm(tmp_path):
    """pretrained=True goes through timm's normal path (here a local weight file via the cfg overlay)."""
    torch.manual_seed(0)
    source = timm.create_model('resnet18', num_classes=3)
    path = tmp_path / 'weights.pth'
    torch.save(source.state_dict(), path)
    model = timm.create_model('fmd_resnet18.a1_in1k', pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=3),
                              fmd_input_size=(3, 64, 64))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    assert model.pretrained_cfg['architecture'] == 'resnet18' and model.pretrained_cfg['tag'] == 'a1_in1k'


def test_checkpoints_move_between_fmd_and_plain_models_strictly():
    fmd = timm.create_model('fmd_cifar_resnet20', fmd_prob=0.1, fmd_block_size=3)
    plain = timm.create_model('cifar_resnet20')
    plain.load_state_dict(fmd.state_dict(), strict=True)
    fmd.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fmd.eval()(x), plain.eval()(x))


def test_create_model_suggests_and_applies():
    with pytest.raises(ValueError, match=r"unknown model 'resnet5O'; did you mean resnet50"):
        timm_fmd.create_model('resnet5O')
    model = timm_fmd.create_model('resnet18', num_classes=2, fmd_prob=0.05, fmd_input_size=(3, 64, 64))
    assert len(fmd_ops(model)) == 14 and model.num_classes == 2
    assert fmd_ops(timm_fmd.create_model('resnet18')) == []


def test_compiled_fmd_model_trains_a_step():
    torch.manual_seed(0)
    model = timm.create_model('fmd_cifar_resnet20', fmd_prob=0.1, fmd_block_size=3, fmd_mode='exact')
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(model, backend='aot_eager')
    before = model.fc.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(compiled(torch.randn(8, 3, 32, 32)), torch.arange(8) % 10)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.fc.weight)


def test_export_in_eval_mode_equals_the_base_model():
    torch.manual_seed(0)
    base = timm.create_model('cifar_resnet20').eval()
    model = timm.create_model('fmd_cifar_resnet20', fmd_prob=0.1, fmd_block_size=3).eval()
    model.load_state_dict(base.state_dict())
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    assert torch.equal(exported.module()(x), base(x))


def test_compiled_op_follows_the_ramp_without_recompiling():
    from timm_fmd.ops.distortion import BlockFeatureMapDistortion
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    op = BlockFeatureMapDistortion(0.2, 3, gamma=0.0, ramp_steps=4)  # gamma=0: distorted elements become 0
    timm_fmd.set_schedule_step(op, 0)
    compiled = torch.compile(op, backend=counting_backend)
    x = torch.randn(64, 32, 16, 16)
    fractions = []
    for step in range(6):
        fractions.append((compiled(x) == 0).float().mean().item())
        if step == 0:
            first_call = len(graphs)
        timm_fmd.step_schedule(op)
    assert len(graphs) == first_call  # the rising ramp compiles nothing new
    # 524,288 elements in blocks of 9: each fraction is within 0.01 of the ramp's value
    assert fractions == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2], abs=0.01)


def test_create_model_builds_plain_names_through_the_twin():
    """fmd_* arguments on a plain name take the fmd_ twin, so every build option (here an FX-traced
    features_only model, where FMD must go in before tracing) puts FMD where the twin does."""
    model = timm_fmd.create_model('resnet18', features_only=True, feature_cls='fx', out_indices=(3, 4),
                                  fmd_input_size=(3, 64, 64))
    assert type(model).__name__ == 'FeatureGraphNet' and len(fmd_ops(model)) == 14
    assert {op.site.kind for _, op in fmd_ops(model)} == {'conv', 'skip'}
