import pytest
import torch
import torch.nn as nn

from timm_fmd.ops.next_layer import NextLayer, resolve_next_layer

CONVS = [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, 3, stride=2, padding=1),
    nn.Conv2d(4, 6, (3, 2), padding=(2, 1), dilation=2),
    nn.Conv2d(4, 6, 3, padding=1, groups=2),
    nn.Conv2d(4, 8, 3, padding=1, groups=4),  # depthwise, multiplier 2
    nn.Conv2d(4, 6, 1),
    nn.Linear(4, 6),
]


@pytest.mark.parametrize('layer', CONVS, ids=lambda m: repr(m))
def test_apply_and_transpose_row_match_autograd(layer):
    torch.manual_seed(0)
    layer = layer.double()
    nl = NextLayer(layer)
    shape = (4,) if isinstance(layer, nn.Linear) else (4, 7, 6)
    g = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    if isinstance(layer, nn.Linear):
        expected = layer(g) - layer.bias
    else:
        expected = layer(g[None])[0] - layer.bias.view(-1, 1, 1)
    q = nl.apply(g.detach())
    torch.testing.assert_close(q, expected.detach())
    for k in range(q.shape[0]):
        r = torch.randn(q.shape[1:], dtype=torch.float64)
        (grad,) = torch.autograd.grad(expected[k], g, r, retain_graph=True)
        torch.testing.assert_close(nl.transpose_row(torch.tensor([k]), r, tuple(shape)), grad)


def test_channel_max_respects_groups():
    layer = nn.Conv2d(4, 6, 3, groups=2)
    k_max = NextLayer(layer).channel_max()
    w = layer.weight.detach()
    for c in range(4):
        group = c // 2
        rows = w[group * 3:(group + 1) * 3, c % 2]
        torch.testing.assert_close(k_max[c], rows.amax(0))
    lin = nn.Linear(5, 3)
    torch.testing.assert_close(NextLayer(lin).channel_max(), lin.weight.detach().amax(0))


def test_resolve_and_check_fits():
    from timm.layers import ConvNormAct
    wrapper = ConvNormAct(4, 6, 3)
    assert resolve_next_layer(wrapper) is wrapper.conv
    with pytest.raises(TypeError, match='next_layer must be an nn.Linear, an nn.Conv2d'):
        resolve_next_layer(nn.Sequential(nn.ReLU()))
    nl = NextLayer(nn.Conv2d(4, 6, 3, groups=2))
    assert nl.in_channels == 4 and nl.window == 9
    nl.check_fits(4, 2)
    with pytest.raises(ValueError, match='expects 4 input channels'):
        nl.check_fits(6, 2)
    with pytest.raises(ValueError, match='needs a \\(B, C, H, W\\) feature map'):
        nl.check_fits(4, 1)
    with pytest.raises(TypeError, match='nn.Module or a weight tensor'):
        NextLayer([1, 2])
