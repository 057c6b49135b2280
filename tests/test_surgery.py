"""The model changes after FMD was put in (issue 12, section 3).

What fine-tuning users do -- freeze or convert norms, swap heads, prune blocks, re-parameterise,
move and wrap the model -- and what FMD must do about it: follow the change (sites re-found at
their module path, next layers re-linked to the layer now there), or warn naming every site it
lost; ``fmd_ops`` / ``describe`` / ``site_summary`` list the sites the next training forward runs.
"""
import copy
import warnings

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import DropBlock2d, freeze_batch_norm_2d, unfreeze_batch_norm_2d

import timm_fmd
from timm_fmd import describe, fmd_ops, reapply_fmd, remove_fmd, site_summary
from timm_fmd.attach import in_place
from timm_fmd.ops.distortion import FeatureMapDistortion

X = torch.randn(2, 3, 64, 64)
SUMMARY_14 = ('FMD: 14 sites (12 linked to a next layer, 2 use the fixed weight 0.01)\n'
              '  stage 3 (layer3): 5 conv, 2 skip\n'
              '  stage 4 (layer4): 5 conv, 2 skip')


def _resnet18(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('fmd_resnet18', fmd_prob=0.2, fmd_block_size=3, fmd_input_size=(3, 64, 64), **kwargs)


def _runs_every_site(model, x=X):
    model.train()
    for _, op in fmd_ops(model):
        op.last_fraction = None
    out = model(x)
    out.float().pow(2).mean().backward()
    return all(op.last_fraction is not None for _, op in fmd_ops(model))


def _quietly(fn, *args):
    """Run ``fn``; any warning fails the test (FMD followed the change, nothing to say)."""
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        return fn(*args)


def _fuse_conv_bn(model):
    return torch.ao.quantization.fuse_modules(model.eval(), [['layer3.0.conv2', 'layer3.0.bn2']]).train()


@pytest.mark.parametrize('change,host', [
    (freeze_batch_norm_2d, 'FrozenBatchNorm2d'),
    (lambda m: unfreeze_batch_norm_2d(freeze_batch_norm_2d(m)), 'BatchNorm2d'),
    (lambda m: timm.utils.freeze(m, ['layer3', 'layer4']) or m, 'FrozenBatchNorm2d'),
    (_fuse_conv_bn, 'Identity'),  # conv and norm fused: the fused conv's output is the site
], ids=['freeze_batch_norm_2d', 'unfreeze', 'timm.utils.freeze', 'fuse_modules'])
def test_norm_conversions_keep_every_site(change, host):
    """The issue's case: freeze_batch_norm_2d used to keep 8 of 14 sites, silently, and describe showed 14."""
    model = change(_resnet18())
    assert type(model.layer3[0].bn2).__name__ == host
    ops = _quietly(fmd_ops, model)
    assert len(ops) == 14 and ops[1] == ('layer3.0.bn2.fmd', model.layer3[0].bn2.fmd)
    assert _quietly(site_summary, model) == SUMMARY_14
    assert len(describe(model).splitlines()) == 3 + 14 + 1  # title, header, rule, one row a site, the legend
    assert _quietly(_runs_every_site, model)



def test_site_summary_counts_the_fixed_weight_sites_in_words():
    """One site on the fixed weight (layer4's last block output feeds the pool): "1 uses", not "1 use"."""
    assert site_summary(_resnet18(fmd_sites=('skip',), fmd_stages=(-1,))) == (
        'FMD: 2 sites (1 linked to a next layer, 1 uses the fixed weight 0.01)\n  stage 4 (layer4): 2 skip')


def test_fused_norm_slots_follow_frozen_norms():
    """timm's BatchNormAct2d holds the op in its drop slot; its frozen twin takes the slot along."""
    model = timm.create_model('fmd_tinynet_e', fmd_input_size=(3, 64, 64))
    before = {path: op for path, op in fmd_ops(model)}
    model = freeze_batch_norm_2d(model)
    assert type(model.blocks[6][0].bn1).__name__ == 'FrozenBatchNormAct2d'
    assert _quietly(lambda: dict(fmd_ops(model))) == before and len(before) == 24


def test_frozen_model_equals_the_frozen_base_in_eval():
    base = freeze_batch_norm_2d(timm.create_model('resnet18', num_classes=4)).eval()
    model = freeze_batch_norm_2d(_resnet18(num_classes=4))
    model.load_state_dict(base.state_dict())
    assert torch.equal(model.eval()(X), base(X))
    assert _runs_every_site(model)


def test_fused_conv_keeps_no_stray_hook():
    """fuse_modules moves the norm's hooks onto the fused conv: eval forwards still run, and the site
    follows to the Identity left at the norm's path (the same tensor) while the stray hook goes."""
    model = _fuse_conv_bn(_resnet18())
    assert len(model.layer3[0].conv2._forward_hooks) == 1
    model.eval()(X)
    assert _quietly(_runs_every_site, model) and not model.layer3[0].conv2._forward_hooks
    assert len(fmd_ops(model)) == 14 and isinstance(model.layer3[0].bn2.fmd, FeatureMapDistortion)


def test_sync_batchnorm_then_compile():
    """timm's train.py --sync-bn --torchcompile converts the norms (dropping FMD's hooks on 5 of the 9 sites)
    right before compiling: the compiled graph still holds every site, in one graph (fullgraph)."""
    from timm.layers import convert_sync_batchnorm
    model = convert_sync_batchnorm(timm.create_model('fmd_test_resnet', fmd_block_size=3, fmd_input_size=(3, 64, 64)))
    assert sum(isinstance(m, nn.SyncBatchNorm) and not m._forward_hooks and 'fmd' in m._modules
               for m in model.modules()) == 5
    assert _traced_sites(model) == 9



@pytest.mark.parametrize('copy_first', [False, True], ids=['model', 'deep copy'])
def test_sync_batchnorm_then_compile_without_an_eager_forward(copy_first):
    """The same for a model never run eagerly, and for a deep copy of it (an EMA copy, then converted and
    compiled): the trace-time sync finds the root by ``id`` (torch 2.11's dynamo passes no module to it)."""
    import copy
    from timm.layers import convert_sync_batchnorm
    model = timm.create_model('fmd_test_resnet', fmd_block_size=3, fmd_input_size=(3, 64, 64))
    if copy_first:
        model = copy.deepcopy(model)
    assert _traced_sites(convert_sync_batchnorm(model)) == 9

def _traced_sites(model):
    """How many FMD ops the compiled training forward runs (module paths of the traced graph's nodes)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model.train(), backend=backend, fullgraph=True)(X)
    ops = set()
    for gm in graphs:
        for node in gm.graph.nodes:
            for path, cls in (node.meta.get('nn_module_stack') or {}).values():
                if isinstance(cls, type) and issubclass(cls, FeatureMapDistortion):
                    ops.add(path)
    assert len(graphs) == 1
    return len(ops)


def test_new_classifier_is_relinked():
    """paper_cnn's last FC site feeds the classifier: a new classifier (or one inside a new head) is the
    layer that now consumes the site's output."""
    model = timm.create_model('fmd_paper_cnn')
    model.reset_classifier(5)
    assert _quietly(lambda: [(p, op.site.next_layer) for p, op in fmd_ops(model)]) == [
        ('fc_stages.0.act.fmd', 'fc_stages.1.fc'), ('fc_stages.1.act.fmd', 'fc')]
    assert model.fc_stages[1].act.fmd.next_layer is model.fc and model.fc.out_features == 5
    model.fc = nn.Sequential(nn.Dropout(0.1), nn.Linear(2048, 3))
    assert _quietly(lambda: fmd_ops(model)[1][1].site.next_layer) == 'fc.1'
    assert model.fc_stages[1].act.fmd.next_layer is model.fc[1]
    assert _runs_every_site(model, torch.randn(2, 3, 32, 32))


def test_removed_classifier_is_named():
    model = timm.create_model('fmd_paper_cnn')
    model.reset_classifier(0)
    with pytest.warns(UserWarning, match=r'^FMD site\(s\) lost their next layer after the model changed and use the '
                                         r'fixed weight 0.01 instead: fc_stages.1.act \(next layer fc is now Identity: '
                                         r'next_layer must be an nn.Linear, an nn.Conv2d or a module containing one, '
                                         r'got Identity\)$'):
        ops = fmd_ops(model)
    assert [op.site.next_layer for _, op in ops] == ['fc_stages.1.fc', None]
    assert ops[1][1].next_layer is None and describe(model).splitlines()[-2].endswith('(none: w=0.01)')
    assert _runs_every_site(model, torch.randn(2, 3, 32, 32))


def test_removed_blocks_are_named_at_the_next_training_forward():
    model = _resnet18()
    model.layer4 = model.layer4[:1]
    with pytest.warns(UserWarning) as caught:
        assert _runs_every_site(model)
    assert [str(w.message) for w in caught] == [
        'FMD lost 3 site(s) after the model changed; they will not run: layer4.1 (its module is gone), '
        'layer4.1.drop_block (its module is gone), layer4.1.bn2 (its module is gone)',
        'FMD site(s) lost their next layer after the model changed and use the fixed weight 0.01 instead: '
        'layer4.0.bn2 (next layer layer4.1.conv1 is gone), layer4.0.downsample.1 (next layer layer4.1.conv1 is '
        'gone), layer4.0 (next layer layer4.1.conv1 is gone)']
    assert site_summary(model) == ('FMD: 11 sites (8 linked to a next layer, 3 use the fixed weight 0.01)\n'
                                   '  stage 3 (layer3): 5 conv, 2 skip\n  stage 4 (layer4): 3 conv, 1 skip')
    assert _quietly(_runs_every_site, model)  # said once


def test_pruned_vit_blocks_are_named():
    model = timm.create_model('fmd_vit_tiny_patch16_224', img_size=64)
    model.prune_intermediate_layers(indices=[10])
    with pytest.warns(UserWarning) as caught:
        ops = fmd_ops(model)
    assert [str(w.message) for w in caught] == [
        'FMD lost 1 site(s) after the model changed; they will not run: blocks.11 (its module is gone)',
        'FMD site(s) lost their next layer after the model changed and use the fixed weight 0.01 instead: '
        'blocks.10 (next layer blocks.11.attn.qkv is gone)']
    assert [(p, op.site.next_layer) for p, op in ops] == [('blocks.10.fmd', None)]


def test_reparameterised_branches_are_named():
    """RepVGG's reparameterisation (for deployment) deletes the branches whose norms held sites."""
    from timm.utils import reparameterize_model
    model = timm.create_model('fmd_repvgg_a0', fmd_input_size=(3, 64, 64))
    assert len(fmd_ops(model)) == 45
    model = reparameterize_model(model)
    with pytest.warns(UserWarning) as caught:
        ops = fmd_ops(model)
    assert len(ops) == 15 and all(p.endswith('.fmd') and op.site.kind == 'skip' for p, op in ops)
    lost = str(caught[0].message)
    assert lost.startswith('FMD lost 30 site(s) after the model changed; they will not run: '
                           'stages.2.0.conv_kxk.bn.drop (its module is gone), stages.2.0.conv_1x1.bn.drop (its')


def test_a_slot_taken_by_another_module_is_named():
    model = _resnet18()
    model.layer3[0].drop_block = DropBlock2d(0.1, 3)
    with pytest.warns(UserWarning, match=r'^FMD lost 1 site\(s\) after the model changed; they will not run: '
                                         r'layer3.0.drop_block \(its slot now holds DropBlock2d\)$'):
        assert len(fmd_ops(model)) == 13


def test_an_emptied_slot_takes_its_op_back():
    model = _resnet18()
    op = model.layer3[0].drop_block
    model.layer3[0].drop_block = nn.Identity()
    assert _quietly(fmd_ops, model) and model.layer3[0].drop_block is op


def test_moved_modules_keep_their_ops_and_links():
    """A stage wrapped in another container: the ops are where the modules went, paths follow them."""
    model = _resnet18()
    model.layer4 = nn.Sequential(model.layer4)
    ops = dict(_quietly(fmd_ops, model))
    assert len(ops) == 14 and ops['layer4.0.0.bn2.fmd'] is model.layer4[0][0].bn2.fmd
    site = ops['layer4.0.0.bn2.fmd'].site
    assert (site.path, site.next_layer) == ('layer4.0.0.bn2', 'layer4.0.1.conv1')
    assert ops['layer3.1.fmd'].site.next_layer == 'layer4.0.0.conv1'  # layer3.1 links into the moved stage
    assert _quietly(_runs_every_site, model)


def test_a_copied_block_brings_its_own_ops():
    """A deep copy of a block carries copies of its ops (and hooks): those are listed, linked to the model's
    layers -- the copy of a link outside the block is re-linked to the layer at its path."""
    model = _resnet18()
    model.layer3[1] = copy.deepcopy(model.layer3[1])
    ops = dict(_quietly(fmd_ops, model))
    assert len(ops) == 14 and ops['layer3.1.bn2.fmd'] is model.layer3[1].bn2.fmd
    assert ops['layer3.1.drop_block'] is model.layer3[1].drop_block
    assert ops['layer3.1.drop_block'].next_layer is model.layer3[1].conv2
    assert ops['layer3.1.bn2.fmd'].next_layer is model.layer4[0].conv1
    assert _quietly(_runs_every_site, model)


@pytest.mark.parametrize('change', [
    lambda m: m.set_grad_checkpointing(True),
    lambda m: m.to(memory_format=torch.channels_last),
    lambda m: m.to(torch.float64),
], ids=['set_grad_checkpointing', 'channels_last', 'float64'])
def test_changes_that_keep_the_modules(change):
    model = _resnet18()
    links = {p: op.next_layer for p, op in fmd_ops(model)}
    change(model)
    assert in_place(model) and reapply_fmd(model) == 0
    assert {p: op.next_layer for p, op in fmd_ops(model)} == links
    dtype = next(model.parameters()).dtype
    assert _runs_every_site(model, X.to(dtype))


def test_resized_input_keeps_the_sites():
    """ViT.set_input_size resizes the position embedding: same sites, now on 37 tokens."""
    model = timm.create_model('fmd_vit_tiny_patch16_224', img_size=64)
    model.set_input_size(img_size=96)
    assert _quietly(describe, model, (3, 96, 96)).splitlines()[3].split()[4] == '37x192'
    assert _runs_every_site(model, torch.randn(2, 3, 96, 96))


def test_ema_copy_follows_its_own_changes():
    from timm.utils import ModelEmaV3
    model = _resnet18()
    ema = ModelEmaV3(model, decay=0.9)
    ema.module = freeze_batch_norm_2d(ema.module)
    assert in_place(model) and not in_place(ema.module)
    ema_ops = dict(_quietly(fmd_ops, ema.module))
    assert len(ema_ops) == 14 and ema_ops['layer3.0.bn2.fmd'] is ema.module.layer3[0].bn2.fmd
    assert all(op is not model.get_submodule(p) for p, op in ema_ops.items())


def test_remove_after_a_change():
    plain = freeze_batch_norm_2d(timm.create_model('resnet18', num_classes=4))
    model = freeze_batch_norm_2d(_resnet18(num_classes=4))
    remove_fmd(model)
    assert fmd_ops(model) == [] and timm_fmd.fmd_settings(model) is None and not model._forward_pre_hooks
    assert not any(m._forward_hooks for m in model.modules())
    model.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    a = model.train()(X)
    torch.manual_seed(1)
    assert torch.equal(a, plain.train()(X))


def test_a_followed_op_takes_the_models_mode_and_device():
    """Ops out of the model (their norm replaced) missed .train() and .to(): they catch up when they follow."""
    model = freeze_batch_norm_2d(_resnet18().eval())  # the ops leave the model in eval mode
    model.train()
    assert _runs_every_site(model)
    model = freeze_batch_norm_2d(_resnet18()).to('meta')
    assert {op.prob_now.device.type for _, op in fmd_ops(model)} == {'meta'}


@pytest.mark.cuda
def test_moved_to_the_gpu():
    model = _resnet18()
    links = {p: op.next_layer for p, op in fmd_ops(model)}
    model.cuda()
    assert in_place(model) and {p: op.next_layer for p, op in fmd_ops(model)} == links
    assert all(op.prob_now.is_cuda for _, op in fmd_ops(model))
    assert _runs_every_site(model, X.cuda())
    model = freeze_batch_norm_2d(model)
    assert all(op.prob_now.is_cuda for _, op in fmd_ops(model)) and _runs_every_site(model, X.cuda())
