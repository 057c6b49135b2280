"""ERC diagnostics of a model's layers (timm_fmd.train.rademacher)."""
import pytest
import timm
import torch

import timm_fmd  # noqa: F401  (registers fmd_ models)
from timm_fmd.ops.erc import empirical_rademacher_complexity
from timm_fmd.train.rademacher import erc_layers, layer_erc


def test_erc_layers_are_the_next_layers_of_the_sites():
    fmd = timm.create_model('fmd_cifar_resnet20', fmd_stages=(-1,), fmd_sites=('conv',))
    plain = timm.create_model('cifar_resnet20')
    layers = erc_layers(fmd)
    assert layers == erc_layers(plain, stages=(-1,), kinds=('conv',))  # the same places with or without FMD
    assert layers[:3] == ['stages.2.0.conv2', 'stages.2.1.conv1', 'stages.2.1.conv2']  # in module order


def test_layer_erc_matches_the_estimator_on_captured_outputs():
    torch.manual_seed(0)
    model = timm.create_model('cifar_resnet20').eval()
    batches = [(torch.randn(16, 3, 32, 32), None) for _ in range(3)]
    result = layer_erc(model, batches, ['stages.2.0.conv2', 'fc'], max_batches=2, draws=32, seed=7)
    # recompute by hand: the same batches, the same seeded generator, in the same order
    outs = {}
    hooks = [model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: outs.setdefault(p, []).append(o))
             for p in ('stages.2.0.conv2', 'fc')]
    with torch.no_grad():
        for x, _ in batches[:2]:
            model(x)
    for h in hooks:
        h.remove()
    gen = torch.Generator().manual_seed(7)
    expected = {p: [] for p in outs}
    for i in range(2):
        for p in ('stages.2.0.conv2', 'fc'):
            expected[p].append(empirical_rademacher_complexity(outs[p][i], 32, generator=gen)[0])
    for p, values in expected.items():
        assert result[p][0] == pytest.approx(sum(values) / 2)
        assert result[p][1] == pytest.approx(torch.tensor(values, dtype=torch.float64).std().item() / 2 ** 0.5)
    assert not model.training


def test_layer_erc_errors():
    model = timm.create_model('cifar_resnet20')
    with pytest.raises(ValueError, match=r"layers \['nope'\] are not modules of CifarResNet"):
        layer_erc(model, [], ['nope'])
    with pytest.raises(ValueError, match='max_batches must be >= 1'):
        layer_erc(model, [], ['fc'], max_batches=0)
    with pytest.raises(ValueError, match='no batch to measure'):
        layer_erc(model, [], ['fc'])
