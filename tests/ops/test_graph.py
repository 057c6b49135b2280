"""What the op puts into a compiled graph: ops inductor can lower on every device.

Inductor's CPU backend lowers a dtype-reinterpreting view of a bool tensor, its CUDA backend does not
("torch.bool is not supported by torch.iinfo, target: aten.view.dtype", seen on an H200). So a CPU compile
cannot catch it; instead the op is traced to aten graphs (forward and backward, as inductor would receive
them) and every ``aten.view.dtype`` node is checked.
"""
import math

import pytest
import torch
import torch.nn as nn
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from timm_fmd.ops.distortion import BlockFeatureMapDistortion, FeatureMapDistortion, feature_map_distortion


def _bool_views(graphs):
    found = []
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == 'call_function' and node.target is torch.ops.aten.view.dtype:
                src = node.args[0].meta['val'].dtype
                if torch.bool in (src, node.args[1]):
                    found.append(f'{src} -> {node.args[1]}')
    return found


def _traced_graphs(module, x):
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    compiled = torch.compile(module, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    compiled(x).sum().backward()
    return graphs


@pytest.mark.parametrize('make', [
    lambda: FeatureMapDistortion(0.2, next_layer=nn.Conv2d(6, 4, 3, padding=1)),
    lambda: BlockFeatureMapDistortion(0.2, 3, next_layer=nn.Conv2d(6, 4, 3, padding=1)),
    lambda: BlockFeatureMapDistortion(0.2, 4, shared_mask=True, mode='exact', next_layer=nn.Conv2d(6, 4, 3, padding=1)),
], ids=['element', 'block', 'shared-exact'])
def test_no_dtype_reinterpreting_views_of_bool_tensors(make):
    torch.manual_seed(0)
    m = make()
    graphs = _traced_graphs(m, torch.randn(2, 6, 9, 9, requires_grad=True))
    assert len(graphs) == 2  # forward and backward, no graph break
    assert _bool_views(graphs) == []


def test_the_check_sees_a_bool_view():
    """The scan itself finds the pattern that failed on the GPU."""
    class BoolView(nn.Module):
        def forward(self, x):
            m = (torch.rand(x.shape) < 0.5).view(torch.uint8)
            return x * m.view(torch.bool)

    graphs = _traced_graphs(BoolView(), torch.randn(3, 4, requires_grad=True))
    assert _bool_views(graphs) == ['torch.bool -> torch.uint8', 'torch.uint8 -> torch.bool']


def test_compiles_without_graph_breaks_when_shapes_change():
    """A second shape makes dynamo retrace with symbolic sizes: the op must still trace in one graph
    (no sort of symbolic strides, no explicit generator=None, the seed-rate table specialised to the map)."""
    torch._dynamo.reset()
    m = BlockFeatureMapDistortion(0.2, 3, next_layer=nn.Conv2d(6, 4, 3, padding=1))
    compiled = torch.compile(m, backend='aot_eager', fullgraph=True)
    for shape in ((2, 6, 9, 9), (3, 6, 9, 9), (4, 6, 10, 11), (5, 6, 9, 9)):
        x = torch.randn(shape, requires_grad=True)
        out = compiled(x)
        out.sum().backward()
        assert out.shape == shape and 0.5 < (x.grad != 0).float().mean().item() < 0.95


def check_compiles_again_with_other_settings(x, layer, **kw):
    """A float that differs from the one a function was first compiled with is made symbolic by dynamo (automatic
    dynamic): a second module with another gamma, or the functional op called with another prob and gamma, must still
    trace in one graph (no host check or host-solved seed rate of a symbolic float) and use the new values: compiled
    equals eager, draw for draw (the same seed; ``kw`` chooses an op whose compiled and eager draws are the same),
    up to rounding."""
    outs = []
    for gamma in (1.0, 3.0):
        m = BlockFeatureMapDistortion(0.2, 3, next_layer=layer, gamma=gamma, **kw)
        torch.manual_seed(1)
        out = torch.compile(m, backend='aot_eager', fullgraph=True)(x)
        torch.manual_seed(1)
        torch.testing.assert_close(out, m(x))
        outs.append(out)

    for block_size in (3, None):
        def op(x, prob, gamma):
            return feature_map_distortion(x, prob, gamma=gamma, block_size=block_size, next_layer=layer, **kw)

        compiled = torch.compile(op, backend='aot_eager', fullgraph=True)
        for prob, gamma in ((0.1, 1.0), (0.3, 3.0)):
            torch.manual_seed(1)
            out = compiled(x, prob, gamma)
            torch.manual_seed(1)
            torch.testing.assert_close(out, op(x, prob, gamma))
            outs.append(out)
        for bad in (math.inf, math.nan, -1.0):  # still checked when symbolic (dynamo assumes such floats finite)
            with pytest.raises(Exception, match='gamma must be a finite float >= 0'):
                compiled(x, 0.3, bad)
    for a, b in zip(outs[::2], outs[1::2]):
        assert not torch.equal(a, b)  # the settings took effect


def test_compiles_again_with_other_settings():
    torch.manual_seed(0)
    check_compiles_again_with_other_settings(torch.randn(2, 6, 9, 9), nn.Conv2d(6, 8, 3, padding=1), mode='exact')
