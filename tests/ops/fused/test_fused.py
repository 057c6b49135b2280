"""The fused Triton path against the PyTorch reference, run by Triton's interpreter on CPU tensors.

The kernels report what they drew (mask, block seed field, normals, signs); the reference path, given that
mask and that noise, must compute the kernels' output, and the reference dilation of the reported seed field
must give the kernels' mask bit for bit. Interpreted programs cost ~50 ms each whatever their size, so the
maps are small and one program covers a whole batch chunk (large tiles); a few tests shrink the tiles to
exercise the halo between tiles.
"""
import math

import pytest
import torch
import torch.nn as nn

from timm_fmd.ops import fused
from timm_fmd.ops.distortion import BlockFeatureMapDistortion, FeatureMapDistortion, _distort
from timm_fmd.ops.masks import block_mask, block_seed_rate, clamp_block_size, grow_blocks
from timm_fmd.ops.next_layer import NextLayer
from timm_fmd.ops.noise import GivenNoise
from ..test_graph import check_compiles_again_with_other_settings

pytestmark = pytest.mark.interpreter


@pytest.fixture(autouse=True)
def _fused_on_cpu():
    with fused.forced():
        yield


def _canonical(x, layout):
    return x.movedim(layout.index('C'), 1) if layout else x


def _report(x, prob, layout=None, mode='approx', next_layer=None, block_size=None, shared=False, gamma=1.0, seed=0):
    xc = _canonical(x, layout)
    nl = None if next_layer is None else NextLayer(next_layer)
    report = {}
    out, fraction = fused.distort(xc, prob, gamma=gamma, exact=mode == 'exact' and nl is not None, next_layer=nl,
                                  block_size=block_size, shared_mask=shared,
                                  generator=torch.Generator(x.device).manual_seed(seed), report=report)
    report['out'], report['fraction'] = out, fraction
    return report


def _reference_given(x, prob, report, layout=None, mode='approx', next_layer=None, block_size=None, shared=False,
                     gamma=1.0):
    xc = _canonical(x, layout)
    mask = report['mask'].reshape((xc.shape[0], -1) + tuple(xc.shape[2:])).bool()
    if shared:
        mask = mask[:, :1]
    signs = report.get('weight_signs')
    if signs is not None:
        signs = signs.reshape(NextLayer(next_layer).channel_max().shape).bool()
    noise = GivenNoise(sigma=report['sigma'], weight_signs=signs, normal=report['normal'].reshape(xc.shape))
    out, fraction = _distort(x, prob, gamma=gamma, lam=0.0, steps=1, mode=mode, next_layer=next_layer,
                             block_size=block_size, shared_mask=shared, layout=layout, generator=None, mask=mask,
                             noise=noise)
    return out, fraction, mask


def _check_against_reference(x, prob, **kw):
    report = _report(x, prob, **kw)
    ref, ref_fraction, mask = _reference_given(x, prob, report, **kw)
    out = report['out'].movedim(1, kw['layout'].index('C')) if kw.get('layout') else report['out']
    assert out.dtype == x.dtype and out.shape == x.shape
    tol = {} if x.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)  # the reference rounds scale to x.dtype
    torch.testing.assert_close(out, ref, equal_nan=True, **tol)
    assert float(report['fraction']) == pytest.approx(float(ref_fraction), abs=1e-7)
    return report, mask


NEXT = {
    'none': lambda c: None,
    'linear': lambda c: nn.Linear(c, 5),
    'conv3x3': lambda c: nn.Conv2d(c, 6, 3, padding=1),
    'conv1x1': lambda c: nn.Conv2d(c, 6, 1),
    'grouped': lambda c: nn.Conv2d(c, 6, 3, padding=1, groups=2),
}


# ----------------------------------------------------------------------------------------------
# the mask
@pytest.mark.parametrize('size,block_size,shared,tile', [
    ((3, 4, 9, 9), 3, False, None),
    ((3, 4, 10, 7), 4, False, None),  # even block, non-square map
    ((2, 4, 5, 6), 9, False, None),  # block larger than the map: clamped, one seed position per plane
    ((3, 4, 9, 9), 3, True, None),  # one seed field per sample, shared by the channels
    ((1, 2, 13, 12), 5, False, 64),  # tiles of 8x8 overlapping by a halo of 4 rows / columns
    ((2, 3, 9, 7), 2, True, 16),  # tiles of 4x4 with a halo of 1
])
def test_mask_is_the_reference_dilation_of_the_kernels_seed_field(size, block_size, shared, tile, monkeypatch):
    if tile:
        monkeypatch.setattr(fused, 'INTERPRET_TILE_ELEMENTS', tile)
    torch.manual_seed(0)
    report, _ = _check_against_reference(torch.randn(size), 0.25, block_size=block_size, shared=shared)
    assert (report['plan'].n_tiles > 1) == bool(tile)  # the kernels ran the tiles the budget gives
    kh, kw = clamp_block_size(block_size, *size[2:])
    seeds = report['seeds'].bool()
    valid = seeds[:, :, :size[2] - kh + 1, :size[3] - kw + 1]
    assert int(seeds.sum()) == int(valid.sum())  # seeds only where a whole block fits
    expected = grow_blocks(valid, kh, kw).expand(size)
    assert torch.equal(report['mask'].bool(), expected)
    assert valid.any() and not expected.all()


TILINGS = [  # (map, block size, tile budget, packed): cut into several tiles along W
    ((1, 2, 9, 7), 2, 16, False),  # 4x4 tiles advancing 3 columns: one Philox evaluation per element
    ((1, 2, 13, 12), 5, 64, True),  # 8x8 tiles advancing 4 columns: one per four elements, interleaved
]


def check_draws_do_not_depend_on_the_tiling(size, block_size, tile, packed, device, monkeypatch):
    """Element (row, w) takes word w % 4 of Philox at counter (row, w // 4), whether a tile evaluates it once per
    four columns (packed) or once per element: a map cut into small tiles draws what one whole tile draws."""
    gpu = device.type == 'cuda'
    x = torch.randn(size, device=device)
    layer = nn.Conv2d(size[1], 3, 3, padding=1).to(device)
    whole = _report(x, 0.3, block_size=block_size, next_layer=layer, seed=3)
    assert whole['plan'].n_tiles == 1 and whole['plan'].packed  # the plans the kernels ran
    monkeypatch.setattr(fused, 'TILE_ELEMENTS' if gpu else 'INTERPRET_TILE_ELEMENTS', tile)
    cut = _report(x, 0.3, block_size=block_size, next_layer=layer, seed=3)
    assert cut['plan'].n_wt > 1 and cut['plan'].packed == packed
    for k in ('seeds', 'mask', 'normal'):
        assert torch.equal(whole[k], cut[k]), k
    torch.testing.assert_close(cut['out'], whole['out'])  # std(x) merged from other partials: rounding only


@pytest.mark.parametrize('size,block_size,tile,packed', TILINGS)
def test_draws_do_not_depend_on_the_tiling(size, block_size, tile, packed, monkeypatch):
    check_draws_do_not_depend_on_the_tiling(size, block_size, tile, packed, torch.device('cpu'), monkeypatch)


@pytest.mark.parametrize('mode', ['approx', 'exact'])
@pytest.mark.parametrize('size,programs,expected', [
    ((4, 2, 13, 12), 5, (12, 5, 1)),  # 5 statistics programs over 12 tiles: every 5th tile each, unevenly
    ((5, 2, 13, 12), 30, (12, 12, 3)),  # one tile each, the batch in 3 splits
])
def test_statistics_programs_over_several_tiles_or_splits_match_the_reference(mode, size, programs, expected,
                                                                                monkeypatch):
    """As on a GPU, where the tiles outnumber the target programs (several tiles per statistics program) or fall
    short of them (batch splits): the output, G and the realised fraction equal the reference given the mask."""
    monkeypatch.setattr(fused, 'INTERPRET_TILE_ELEMENTS', 64)
    monkeypatch.setattr(fused, '_target_programs', lambda device: programs)
    torch.manual_seed(0)
    report, _ = _check_against_reference(torch.randn(size), 0.25, block_size=5, mode=mode,
                                         next_layer=nn.Conv2d(2, 3, 3, padding=1))
    tiles = report['plan']  # the plan the kernels ran
    assert (tiles.n_tiles, tiles.n_stat, tiles.n_split) == expected


def test_channel_weights_of_more_channels_than_one_block(monkeypatch):
    """A 2x2 map of 200 channels: one tile of 256 channels, whose approx weights are computed in 4 blocks of 64
    (the last past C), signs included."""
    assert fused.plan((2, 200, 2, 2), 4, 2, 2, gpu=False, programs=1).bc == 256
    torch.manual_seed(1)
    _check_against_reference(torch.randn(2, 200, 2, 2), 0.25, block_size=2, next_layer=nn.Conv2d(200, 3, 3, padding=1))


def test_partials_stay_few_on_large_maps():
    """Every apply program merges all the statistics partials: their number must not grow with the map."""
    for shape, channel_stride in (((2, 64, 512, 1024), 512 * 1024), ((2, 64, 512, 1024), 1), ((32, 1024, 14, 14), 196),
                                  ((1, 1, 4096, 4096), 1 << 24), ((64, 768, 1, 197), 1)):
        tiles = fused.plan(shape, channel_stride, 7 if shape[2] > 1 else 1, 7 if shape[2] > 1 else 1, gpu=True,
                           programs=528)
        assert tiles.n_stat * tiles.n_split <= 2 * 528, (shape, tiles)


def test_element_mask_and_normals_depend_on_logical_index_not_memory_layout():
    x = torch.randn(2, 5, 6, 7)
    a = _report(x, 0.3, seed=4)
    b = _report(x.contiguous(memory_format=torch.channels_last), 0.3, seed=4)
    c = _report(x.permute(0, 2, 3, 1).contiguous(), 0.3, layout='NHWC', seed=4)
    for k in ('mask', 'normal'):
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])
    torch.testing.assert_close(b['out'], a['out'])
    assert b['out'].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(c['out'], a['out'])


# ----------------------------------------------------------------------------------------------
# the output equals the reference given the kernels' mask and noise
@pytest.mark.parametrize('kind,mode', [('none', 'approx'), ('conv3x3', 'approx'), ('conv1x1', 'approx'),
                                       ('grouped', 'approx'), ('conv3x3', 'exact'), ('conv1x1', 'exact'),
                                       ('grouped', 'exact')])
@pytest.mark.parametrize('block_size,shared', [(None, False), (3, False), (4, True)])
def test_maps_match_the_reference(kind, mode, block_size, shared):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 7)
    _check_against_reference(x, 0.2, mode=mode, next_layer=NEXT[kind](4), block_size=block_size, shared=shared,
                             gamma=1.7)


@pytest.mark.parametrize('layout,shape,mode', [('NC', (6, 5), 'approx'), ('NC', (6, 5), 'exact'),
                                               ('NLC', (3, 7, 5), 'exact'), ('NCL', (3, 5, 7), 'approx')])
def test_vectors_and_tokens_match_the_reference(layout, shape, mode):
    torch.manual_seed(1)
    _check_against_reference(torch.randn(shape), 0.3, layout=layout, mode=mode, next_layer=nn.Linear(5, 4), gamma=2.0)


@pytest.mark.parametrize('layout', ['NCHW', 'channels_last', 'NHWC', 'strided'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_layouts_and_dtypes_match_the_reference(layout, dtype):
    torch.manual_seed(2)
    x = torch.randn(2, 4, 7, 9)
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == 'NHWC':
        x = x.permute(0, 2, 3, 1).contiguous()
    elif layout == 'strided':  # a non-dense view: read through its strides, no copy
        x = torch.randn(2, 8, 7, 12)[:, ::2, :, 1:10]
    x = x.to(dtype)
    _check_against_reference(x, 0.2, layout='NHWC' if layout == 'NHWC' else None, mode='exact',
                             next_layer=nn.Conv2d(4, 6, 3, padding=1), block_size=3)


@pytest.mark.filterwarnings('ignore:invalid value encountered:RuntimeWarning')  # the interpreter's numpy on inf - inf
def test_non_finite_inputs_propagate_as_in_the_reference():
    torch.manual_seed(3)
    x = torch.randn(2, 4, 6, 6)
    x[0, 1, 2, 3] = float('inf')
    x[1, 2, 0, 0] = float('nan')
    report, mask = _check_against_reference(x, 0.3, next_layer=nn.Conv2d(4, 6, 3, padding=1), block_size=2)
    out = report['out']
    assert torch.isnan(out[mask.expand_as(x)]).all()  # std(x) is NaN: every distorted value is NaN
    kept = ~mask.expand_as(x)
    assert torch.equal(torch.isfinite(out[kept]), torch.isfinite(x[kept]))


def test_finite_half_inputs_give_finite_outputs():
    torch.manual_seed(4)
    x = (torch.randn(4, 8, 7, 7) * 300).to(torch.float16)  # sum of squares far beyond the float16 range
    report = _report(x, 0.3, mode='exact', next_layer=nn.Conv2d(8, 8, 3, padding=1), block_size=3, gamma=3.0)
    assert report['out'].dtype == torch.float16 and torch.isfinite(report['out']).all()


# ----------------------------------------------------------------------------------------------
# statistics of the draws
@pytest.mark.parametrize('tensor_prob', [False, True])
def test_seed_rate_and_realised_fraction(tensor_prob):
    """The kernels' seed rate is the host's (float prob) or the table's (tensor prob) and prob is realised.

    Seeds are Bernoulli(rate) at the 2 x 16 x 10 x 10 valid positions of each call: the seed frequency is
    checked to 4 binomial standard errors; the realised fraction to 4 standard deviations of the fraction
    of reference masks of the same shape.
    """
    shape, block = (2, 16, 14, 14), 5
    for prob in (0.1, 0.5):
        rate = block_seed_rate(prob, 14, 14, block)
        reports = [_report(torch.randn(shape), torch.tensor(prob) if tensor_prob else prob, block_size=block, seed=s)
                   for s in range(2)]
        seeds = torch.stack([r['seeds'][:, :, :10, :10] for r in reports]).float()
        assert abs(seeds.mean().item() - rate) < 4 * math.sqrt(rate * (1 - rate) / seeds.numel())
        spread = torch.stack([block_mask(*shape, prob, block).float().mean() for _ in range(100)]).std().item()
        fraction = sum(float(r['fraction']) for r in reports) / 2
        assert abs(fraction - prob) < 4 * spread / math.sqrt(2)
        assert fraction == pytest.approx(sum(r['mask'].float().mean().item() for r in reports) / 2)


def test_normals_and_signs_are_standard():
    report = _report(torch.randn(16, 32, 8, 8), 0.2, next_layer=nn.Conv2d(32, 64, 3, padding=1))
    z = report['normal'].flatten()  # 32,768 draws: standard errors 0.0055 (mean) and 0.0039 (std)
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.02
    assert abs(report['mask'].float().mean().item() - 0.2) < 0.01  # element mask, 32,768 draws: s.e. 0.0022
    # an element's mask uniform and its normal are words of one Philox evaluation: independent, so the normals
    # of the ~6,550 distorted elements are standard too (s.e. 0.012 of their mean, 0.009 of their std)
    distorted = z[report['mask'].flatten().bool()]
    assert abs(distorted.mean().item()) < 0.05 and abs(distorted.std().item() - 1) < 0.04
    signs = report['weight_signs'].float()  # 288 signs: s.e. 0.03
    assert 0.35 < signs.mean().item() < 0.65


# ----------------------------------------------------------------------------------------------
# the op: randomness, autograd, compile
def test_op_takes_the_fused_path_and_matches_its_report():
    """An eager call runs the same kernels as the report: same generator seed, same output and mask."""
    torch.manual_seed(5)
    x = torch.randn(3, 4, 9, 9, requires_grad=True)
    layer = nn.Conv2d(4, 6, 3, padding=1)
    report = _report(x.detach(), 0.2, mode='exact', next_layer=layer, block_size=3, seed=7)
    out = _distort(x, 0.2, gamma=1.0, lam=0.0, steps=1, mode='exact', next_layer=layer, block_size=3,
                   shared_mask=False, layout=None, generator=torch.Generator().manual_seed(7), mask=None)[0]
    torch.testing.assert_close(out, report['out'], rtol=0, atol=0)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    mask = report['mask'].bool()
    expected = torch.where(mask, 0.0, upstream * float(report['fraction'].neg().add(1).reciprocal()))
    torch.testing.assert_close(x.grad, expected)


def test_autograd_keeps_a_seed_and_statistics_not_a_mask():
    saved = []
    x = torch.randn(4, 8, 14, 14, requires_grad=True)
    m = BlockFeatureMapDistortion(0.2, 5)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        m(x)
    assert sorted(tuple(t.shape) for t in saved) == [(1,), (4,)]  # the seed and (std, scale, fraction, step)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _distort(x, torch.tensor(0.2), gamma=1.0, lam=0.0, steps=1, mode='approx', next_layer=None, block_size=5,
                 shared_mask=False, layout=None, generator=None, mask=None)
    # with a tensor prob also the 0-dim prob (the seed-rate table is read inside the ops)
    assert sorted(t.numel() for t in saved) == [1, 1, 4]


def test_manual_seed_and_generator_decide_the_draws():
    x = torch.randn(2, 4, 8, 8)
    run = lambda **kw: _distort(x, 0.3, gamma=1.0, lam=0.0, steps=1, mode='approx', next_layer=None,  # noqa: E731
                                block_size=3, shared_mask=False, layout=None, mask=None, **kw)[0]
    torch.manual_seed(3)
    a = run(generator=None)
    torch.manual_seed(3)
    assert torch.equal(a, run(generator=None))
    assert not torch.equal(a, run(generator=None))  # the default generator moved on
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert torch.equal(run(generator=g(1)), run(generator=g(1)))
    assert not torch.equal(run(generator=g(1)), run(generator=g(2)))


@pytest.mark.parametrize('use_reentrant', [False, True])
def test_checkpoint_recompute_draws_the_same_mask(use_reentrant):
    """Activation checkpointing recomputes the forward in backward: torch restores its RNG state, so the seed drawn
    from torch's generator is the same and the gradient equals the one without checkpointing."""
    conv = nn.Conv2d(8, 8, 3, padding=1)
    m = BlockFeatureMapDistortion(0.3, 3, next_layer=conv)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    block = lambda t: conv(m(t))  # noqa: E731
    torch.manual_seed(5)
    plain = block(x)
    plain.sum().backward()
    expected, x.grad = x.grad.clone(), None
    torch.manual_seed(5)
    checkpointed = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=use_reentrant)
    checkpointed.sum().backward()
    assert torch.equal(checkpointed, plain) and torch.equal(x.grad, expected)
    assert (expected == 0).any()  # distorted elements get no gradient: a mask was drawn


def test_fallbacks_use_the_reference(monkeypatch):
    """lam > 0, steps > 1 and a user mask take the PyTorch path; the common case does not."""
    calls = []
    monkeypatch.setattr(fused, 'distort', lambda *a, **k: calls.append(1) or (a[0].clone(), torch.tensor(0.0)))
    x = torch.randn(2, 4, 6, 6)
    base = dict(gamma=1.0, mode='approx', next_layer=None, block_size=3, shared_mask=False, layout=None,
                generator=None)
    _distort(x, 0.2, lam=0.1, steps=1, mask=None, **base)
    _distort(x, 0.2, lam=0.0, steps=2, mask=None, **base)
    _distort(x, 0.2, lam=0.0, steps=1, mask=torch.zeros(2, 4, 6, 6, dtype=torch.bool), **base)
    _distort(x.double(), 0.2, lam=0.0, steps=1, mask=None, **base)
    assert calls == []
    _distort(x, 0.2, lam=0.0, steps=1, mask=None, **base)
    assert calls == [1]


def test_forward_and_backward_dispatch_few_ops(monkeypatch):
    """Eager approx forward: K_M (amax) and the seed draw in PyTorch, then 3 Triton kernels launched directly
    (no custom-op dispatch: host time); backward: one kernel and no PyTorch op."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from timm_fmd.ops import kernels

    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(self.name)

    for name in ('fmd_stats_kernel', 'fmd_apply_kernel', 'fmd_grad_kernel'):
        monkeypatch.setattr(kernels, name, Recorder(name))

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in ('empty', 'empty_strided', 'view', 'detach', 'unsqueeze', 'slice',
                                                    'as_strided', 'select', 'alias', 'lift_fresh', 'permute',
                                                    'empty_like', '_to_copy', 'clone', 'reshape'):
                self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    m = BlockFeatureMapDistortion(0.1, 7, next_layer=nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    upstream = torch.randn(2, 8, 9, 9)
    with Ops() as forward:
        out = m(x)
    assert forward.names == ['amax', 'randint']
    assert launches == ['fmd_stats_kernel', 'fmd_apply_kernel']
    with Ops() as backward:
        out.backward(upstream)
    assert backward.names == [] and launches[2:] == ['fmd_grad_kernel']


def check_gradient_of_the_gradient(device, backend=None):
    """``create_graph=True`` through a fused site: the gradient w.r.t. the map, ``where(m, 0, v * scale)``, is linear
    in the upstream gradient ``v``, and so is its gradient w.r.t. ``v`` (upstream ``u``) and that one's w.r.t. ``u``:
    each equals the first-order gradient for an upstream of ones (same seed, same mask) times its upstream.
    ``backend``: the site compiled with that ``torch.compile`` backend (``'eager'``: the ops' registered autograd
    formula runs at backward time; AOT autograd's backends refuse a double backward)."""
    module = BlockFeatureMapDistortion(0.3, 3, next_layer=nn.Conv2d(4, 3, 3, padding=1).to(device))
    site = module if backend is None else torch.compile(module, backend=backend, fullgraph=True)
    x, v, u = (torch.randn(2, 4, 7, 7, device=device, requires_grad=True) for _ in range(3))
    torch.manual_seed(0)
    (gx,) = torch.autograd.grad(site(x), x, v, create_graph=True)
    (gv,) = torch.autograd.grad(gx, v, u, create_graph=True)
    (gu,) = torch.autograd.grad(gv.sum(), u)
    torch.manual_seed(0)
    out = module(x)
    (ones,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(gx, ones * v) and torch.equal(gv, ones * u) and torch.equal(gu, ones)
    assert (ones == 0).any() and (ones > 1).any()  # a mask was drawn, kept values rescaled


@pytest.mark.parametrize('backend', [None, 'eager'])
def test_gradient_of_the_gradient_for_a_gradient_penalty(backend):
    check_gradient_of_the_gradient(torch.device('cpu'), backend)


def test_compiles_into_one_graph_with_the_ops():
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 8, 3, padding=1)
    modules = [BlockFeatureMapDistortion(0.2, 3, next_layer=layer, mode='exact'),
               FeatureMapDistortion(0.2, next_layer=layer)]
    for m in modules:
        x = torch.randn(2, 6, 8, 8, requires_grad=True)
        torch.manual_seed(1)
        eager = m(x)
        eager.backward(torch.ones_like(eager))
        grad, x.grad = x.grad, None
        compiled = torch.compile(m, backend='aot_eager', fullgraph=True)
        torch.manual_seed(1)
        out = compiled(x)
        out.backward(torch.ones_like(out))
        torch.testing.assert_close(out, eager)  # the seed is drawn from torch's generator inside the graph
        torch.testing.assert_close(x.grad, grad)
        assert 0.6 < (x.grad != 0).float().mean().item() < 0.95
    # another batch and map size: dynamo retraces with symbolic sizes, still one graph
    x = torch.randn(3, 6, 9, 10, requires_grad=True)
    compiled(x).sum().backward()
    assert 0.6 < (x.grad != 0).float().mean().item() < 0.95


@pytest.mark.parametrize('exact', [False, True])
def test_ops_pass_torch_library_opcheck(exact):
    """The three ops of compiled graphs: schema (no aliasing or mutation), fake implementations against the real
    ones, fmd_apply's autograd registration, and each op traced by AOT autograd with dynamic shapes, as
    ``torch.library.opcheck`` checks them."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8)
    seed, prob = torch.randint(0, 2 ** 31 - 1, (1,)), torch.tensor(0.2)
    k_max = None if exact else torch.randn(6, 9)
    config = list(fused._Config(3, 3, 1, 0, int(exact), 2, 9, int(not exact), int(not exact)))
    stats_args = (x, seed, prob, k_max, 0.0, 1.0, config)
    parts, coef = fused._stats_op(*stats_args)
    coef = torch.randn(6, 8, 8) if exact else coef  # exact mode applies D, computed from G between the ops
    apply_args = (x.clone().requires_grad_(), seed, prob, parts, coef, 0.0, 1.0, config)
    _, stats = fused._apply_op(*apply_args)
    grad_args = (torch.randn(2, 6, 8, 8), seed, prob, stats.detach(), 0.0, config, list(x.stride()))
    for op, args in ((fused._stats_op, stats_args), (fused._apply_op, apply_args), (fused._grad_op, grad_args)):
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {'SUCCESS'} and len(results) == 4, (op, results)


def test_compiles_again_with_other_settings():
    """As tests/ops/test_graph.py's test of the same name, on the fused path (approx: its compiled and eager draws
    are the same too)."""
    torch.manual_seed(0)
    check_compiles_again_with_other_settings(torch.randn(2, 6, 9, 9), nn.Conv2d(6, 8, 3, padding=1))


def test_the_realised_fraction_has_no_gradient_eager_or_compiled():
    """It is a statistic, not a function of x to differentiate: no autograd graph kept alive by a stored fraction."""
    def run(x):
        return _distort(x, 0.2, gamma=1.0, lam=0.0, steps=1, mode='approx', next_layer=None, block_size=3,
                        shared_mask=False, layout=None, generator=None, mask=None)

    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    for fn in (run, torch.compile(run, backend='aot_eager', fullgraph=True)):
        out, fraction = fn(x)
        assert out.requires_grad and not fraction.requires_grad and fraction.grad_fn is None
