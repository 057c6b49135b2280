"""The FMD op against a per-sample reference of the paper's equations, plus its contract.

The reference below is written straight from the paper, one sample at a time: ``T(x, eps)`` of
Eq. 11 (linear next layer) / Eq. 21 (convolution) is built with a Python loop over the batch and
differentiated by autograd (which picks ``k_hat`` and ``S`` of Eq. 13-14 / 23-24 by itself), then
Eq. 16 takes the step with the paper's ``gamma_p`` and ``lambda_p``, related to the code's ``gamma``
and ``lam`` as the op's docstring states. The approx mode's reference uses Eq. 15 / 22 with the same
random stand-ins the op draws.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_fmd.ops.distortion as distortion
import timm_fmd.ops.positions as positions_mod
from timm_fmd.ops.distortion import BlockFeatureMapDistortion, FeatureMapDistortion, feature_map_distortion
from timm_fmd.ops.erc import distortion_objective
from timm_fmd.ops.masks import block_mask, element_mask
from timm_fmd.ops.next_layer import NextLayer


# ----------------------------------------------------------------------------------------------
# reference
def _next_output(layer, g):
    """Q = K * G without bias, for one map G of shape (C, *spatial)."""
    if isinstance(layer, nn.Linear):
        return F.linear(g.movedim(0, -1), layer.weight).movedim(-1, 0)
    return F.conv2d(g[None], layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)[0]


def _paper_objective(f, eps, mask, sigma, layer, lam_p):
    """T(x, eps), Eq. 11 / 21, summed sample by sample."""
    n = f.shape[0]
    g = sum(sigma[i] * (f[i] - mask[i] * eps[i]) for i in range(n))  # Eq. 8 / 18
    q = _next_output(layer, g)  # Eq. 9 / 19
    positions = q[0].numel()
    sup = max(q[k].abs().sum() for k in range(q.shape[0]))  # sup_k, Eq. 11 / 21
    return sup / (n * positions) + lam_p / (2 * n) * sum(eps[i].pow(2).sum() for i in range(n))


def _scale(mask, f):
    keep = 1.0 - mask.expand_as(f).double().mean()
    return 1.0 / keep


def reference_exact(f, mask, sigma, layer, gamma, lam, steps):
    """Eq. 6 / 17 with ``steps`` updates of Eq. 16 using the exact gradient of T."""
    n = f.shape[0]
    window = 1 if isinstance(layer, nn.Linear) else layer.kernel_size[0] * layer.kernel_size[1]
    positions = _next_output(layer, f[0]).shape[1:].numel()
    gamma_p = gamma * f.std() * n * positions / window
    lam_p = lam * window / positions
    eps = f.clone()  # eps starts at f: dropout
    for _ in range(steps):
        eps = eps.detach().requires_grad_(True)
        t = _paper_objective(f, eps, mask, sigma, layer, lam_p)
        (grad,) = torch.autograd.grad(t, eps)
        eps = eps - gamma_p * grad  # Eq. 16
    return ((f - mask * eps) * _scale(mask, f)).detach()


def reference_approx(f, mask, layer, gamma, lam, steps, generator, shared):
    """Eq. 15 / 22 stand-ins drawn in the op's documented order, then Eq. 16."""
    n, c = f.shape[:2]
    masked = mask.expand_as(f)
    eps = f.clone()
    for _ in range(steps):
        if layer is None:
            w = torch.full((c,), 0.01, dtype=f.dtype)
            window, positions = 1, 1
        elif isinstance(layer, nn.Linear):
            w = layer.weight.detach().amax(0).to(f.dtype)
            window, positions = 1, 1
        else:
            k_max = NextLayer(layer).channel_max().to(f.dtype)
            signs = torch.rand(k_max.shape, generator=generator) < 0.5
            window = k_max.shape[1] * k_max.shape[2]
            w = torch.where(signs, k_max, -k_max).sum((1, 2))  # the window sum of Eq. 22
            w = w * (0.1 if window == 1 else 1.0)
            positions = 1
        # one normal per distorted element, in the op's documented order
        z = torch.randn(int(masked.sum()), generator=generator, dtype=f.dtype)
        u = torch.zeros_like(f)
        if shared and c > 1:
            idx = mask[:, 0].nonzero()
            for k, (b, *s) in enumerate(idx.tolist()):
                u[(b, slice(None), *s)] = z[k * c:(k + 1) * c]
        else:
            u[masked] = z
        gamma_p = gamma * f.std() * n * positions / window
        lam_p = lam * window / positions
        w_b = w.reshape(1, c, *[1] * (f.ndim - 2))
        grad = torch.stack([-(1 / (n * positions)) * u[i] * w_b[0] * masked[i] + lam_p / n * eps[i]
                            for i in range(n)])  # Eq. 15 / 22 (sigma_i u folded into one normal)
        eps = eps - gamma_p * grad
    return (f - masked * eps) * _scale(mask, f)


def _sigma(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (batch,), generator=g).double() * 2 - 1


@pytest.fixture(params=['sparse', 'dense'])
def positions(request, monkeypatch):
    """Run each test with both position representations (CPU eager uses sparse; CUDA/compile dense)."""
    if request.param == 'dense':
        monkeypatch.setattr(distortion, 'positions', lambda mask, xc, dtype: positions_mod._DensePositions(mask, xc, dtype))
    return request.param


NEXT_LAYERS = {
    'linear': lambda c: nn.Linear(c, 5),
    'conv3x3': lambda c: nn.Conv2d(c, 6, 3, padding=1),
    'conv1x1': lambda c: nn.Conv2d(c, 6, 1),
    'conv_strided_dilated': lambda c: nn.Conv2d(c, 6, 3, stride=2, padding=2, dilation=2),
    'conv_grouped': lambda c: nn.Conv2d(c, 6, 3, padding=1, groups=2),
    'conv_depthwise': lambda c: nn.Conv2d(c, 2 * c, 3, padding=1, groups=c),
}


def _problem(kind, block_size, shared=False, seed=0):
    torch.manual_seed(seed)
    layer = NEXT_LAYERS[kind](4).double()
    if kind == 'linear':
        f = torch.randn(6, 4, dtype=torch.float64)
        mask = element_mask(f.shape, 0.3)
    else:
        f = torch.randn(5, 4, 9, 8, dtype=torch.float64)
        mask = block_mask(5, 1 if shared else 4, 9, 8, 0.3, block_size) if block_size else element_mask(f.shape, 0.3)
    return f, mask, layer


# ----------------------------------------------------------------------------------------------
# equality with the reference
@pytest.mark.parametrize('kind', list(NEXT_LAYERS))
@pytest.mark.parametrize('block_size', [None, 3, 4])
@pytest.mark.parametrize('steps,lam', [(1, 0.0), (2, 0.3)])
def test_exact_matches_reference(kind, block_size, steps, lam, positions):
    if kind == 'linear' and block_size:
        pytest.skip('blocks need a 2-D map')
    f, mask, layer = _problem(kind, block_size)
    out = feature_map_distortion(f, 0.3, gamma=0.7, lam=lam, steps=steps, mode='exact', next_layer=layer,
                                 mask=mask, generator=torch.Generator().manual_seed(11))
    ref = reference_exact(f, mask, _sigma(f.shape[0], 11), layer, gamma=0.7, lam=lam, steps=steps)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)


def test_exact_on_tokens_matches_reference():
    torch.manual_seed(3)
    f = torch.randn(4, 7, 6, dtype=torch.float64)  # (B, N, C) tokens -> canonical (B, C, N)
    layer = nn.Linear(6, 5).double()
    mask = element_mask((4, 6, 7), 0.25)
    out = feature_map_distortion(f, 0.25, gamma=2.0, mode='exact', next_layer=layer, mask=mask,
                                 generator=torch.Generator().manual_seed(5))
    ref = reference_exact(f.movedim(2, 1), mask, _sigma(4, 5), layer, gamma=2.0, lam=0.0, steps=1)
    torch.testing.assert_close(out, ref.movedim(1, 2))


@pytest.mark.parametrize('kind', ['linear', 'conv3x3', 'conv1x1', 'none'])
@pytest.mark.parametrize('shared', [False, True])
@pytest.mark.parametrize('steps,lam', [(1, 0.0), (2, 0.5)])
def test_approx_matches_reference(kind, shared, steps, lam):
    if kind == 'linear' and shared:
        pytest.skip('channel-shared masks are block masks on 2-D maps')
    f, mask, layer = _problem('linear' if kind == 'linear' else 'conv3x3', 3, shared=shared, seed=4)
    if kind == 'conv1x1':
        layer = nn.Conv2d(4, 6, 1).double()
    if kind == 'none':
        layer = None
    out = feature_map_distortion(f, 0.3, gamma=1.5, lam=lam, steps=steps, mode='approx', next_layer=layer,
                                 mask=mask, generator=torch.Generator().manual_seed(9))
    ref = reference_approx(f, mask, layer, 1.5, lam, steps, torch.Generator().manual_seed(9), shared)
    torch.testing.assert_close(out, ref)


def test_dense_and_sparse_positions_agree_in_exact_mode(monkeypatch):
    f, mask, layer = _problem('conv_grouped', 4, shared=True)
    kwargs = dict(gamma=0.9, lam=0.1, steps=3, mode='exact', next_layer=layer, mask=mask)
    sparse = feature_map_distortion(f, 0.3, generator=torch.Generator().manual_seed(1), **kwargs)
    monkeypatch.setattr(distortion, 'positions', lambda m, xc, dtype: positions_mod._DensePositions(m, xc, dtype))
    dense = feature_map_distortion(f, 0.3, generator=torch.Generator().manual_seed(1), **kwargs)
    torch.testing.assert_close(sparse, dense)


def test_approx_matches_authors_release_in_distribution():
    """A distorted element of the authors' Disout is gamma * std(f) * w_c * z, then / keep fraction."""
    torch.manual_seed(0)
    f = torch.randn(64, 8, 12, 12) * 3 + 1
    layer = nn.Conv2d(8, 16, 3, padding=1)
    mask = block_mask(64, 8, 12, 12, 0.2, 5)
    gen = torch.Generator().manual_seed(2)
    out = feature_map_distortion(f, 0.2, gamma=5.0, next_layer=layer, mask=mask, generator=gen)
    gen = torch.Generator().manual_seed(2)
    # the authors' per-channel weight: mean over the window of (random sign * max over output channels)
    k_max = layer.weight.detach().amax(0)
    signs = torch.where(torch.rand(k_max.shape, generator=gen) < 0.5, 1.0, -1.0)
    w = (signs * k_max).mean((1, 2))
    keep = 1 - mask.float().mean()
    z = out[mask] * keep / (5.0 * f.std() * w.view(1, 8, 1, 1).expand_as(f)[mask])
    assert abs(z.mean().item()) < 4 / math.sqrt(z.numel())  # ~4 standard errors
    assert abs(z.std().item() - 1) < 0.02
    # kept elements are rescaled, untouched otherwise
    torch.testing.assert_close(out[~mask], f[~mask] / keep)


# ----------------------------------------------------------------------------------------------
# the objective
def _objective_reduction(kind, gamma, seed):
    """Relative drop of T from dropout (eps = f) to one exact FMD step, for the same mask and sigma."""
    f, mask, layer = _problem(kind, None if kind == 'linear' else 3, seed=seed)
    f = f.abs()  # post-activation features, as after a ReLU
    nl = NextLayer(layer)
    out = feature_map_distortion(f, 0.3, gamma=gamma, mode='exact', next_layer=layer, mask=mask,
                                 generator=torch.Generator().manual_seed(seed))
    eps = torch.where(mask.expand_as(f), f - out / _scale(mask, f), f)  # f_hat = f - m * eps
    sigma = _sigma(f.shape[0], seed)  # the op's own draw
    t_dropout = distortion_objective(f, f, mask, sigma, nl)
    return ((t_dropout - distortion_objective(f, eps, mask, sigma, nl)) / t_dropout).item()


@pytest.mark.parametrize('kind', ['linear', 'conv3x3', 'conv_strided_dilated', 'conv_grouped'])
def test_exact_step_lowers_the_objective_below_dropout(kind):
    """A small step always descends; at gamma=1 it descends on average (large steps can overshoot)."""
    small = [_objective_reduction(kind, 0.1, seed) for seed in range(20)]
    assert min(small) > 0, small
    unit = [_objective_reduction(kind, 1.0, seed) for seed in range(20)]
    assert sum(unit) / len(unit) > 0.02, unit


def test_rademacher_gradient_matches_finite_differences():
    from timm_fmd.ops.erc import rademacher_sup
    torch.manual_seed(0)
    for layer, shape in [(nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1), (3, 7, 6)),
                         (nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=4), (4, 6, 6)),
                         (nn.Linear(5, 3), (5,))]:
        nl = NextLayer(layer.double())
        g = torch.randn(shape, dtype=torch.float64)
        _, d = rademacher_sup(nl, g)
        h = 1e-6
        numeric = torch.zeros_like(g)
        for j in range(g.numel()):
            e = torch.zeros(g.numel(), dtype=torch.float64)
            e[j] = h
            e = e.view_as(g)
            numeric.view(-1)[j] = (rademacher_sup(nl, g + e)[0] - rademacher_sup(nl, g - e)[0]) / (2 * h)
        torch.testing.assert_close(d, numeric, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# gradients
@pytest.mark.parametrize('shared', [False, True])
def test_gradcheck_float64(shared, positions):
    """With the distortion held constant (gamma=0 leaves the pure mask-and-rescale path) the op is linear."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    mask = block_mask(2, 1 if shared else 3, 6, 5, 0.3, 2)
    assert torch.autograd.gradcheck(lambda t: feature_map_distortion(t, 0.3, gamma=0.0, mask=mask), (x,))


@pytest.mark.parametrize('mode', ['approx', 'exact'])
def test_gradient_reaches_kept_elements_only(mode, positions):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 10, 10, requires_grad=True)
    layer = nn.Conv2d(6, 8, 3, padding=1)
    mask = block_mask(4, 6, 10, 10, 0.2, 3)
    out = feature_map_distortion(x, 0.2, gamma=3.0, mode=mode, next_layer=layer, mask=mask)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected = torch.where(mask, 0.0, upstream) / (1 - mask.float().mean())
    torch.testing.assert_close(x.grad, expected)
    assert layer.weight.grad is None  # the next layer's weight is read, not trained through eps


# ----------------------------------------------------------------------------------------------
# statistics
@pytest.mark.parametrize('size', [7, 14, 28, 56])
@pytest.mark.parametrize('block_size', [1, 3, 6, 7, 9])
def test_block_mask_realises_prob(size, block_size):
    """prob is the realised fraction at every map and block size (DropBlock's nominal rate is not).

    The solved expectation is checked to 1e-6; the empirical fraction to 0.01, with a sample large
    enough that 0.01 is at least 4 standard errors (a block covering the whole map is the noisiest
    case: one Bernoulli draw per map, so 40,000 maps give a standard error <= 0.0025).
    """
    from timm_fmd.ops.masks import block_seed_rate, expected_block_fraction
    gen = torch.Generator().manual_seed(size * 100 + block_size)
    maps = 40_000 if size <= 14 else 4_096  # 4,096 maps of 28x28 hold >= 39,000 independent 9x9 blocks
    for prob in (0.05, 0.1, 0.3):
        rate = block_seed_rate(prob, size, size, block_size)
        assert expected_block_fraction(rate, size, size, block_size) == pytest.approx(prob, abs=1e-6)
        mask = block_mask(maps // 64, 64, size, size, prob, block_size, generator=gen)
        assert abs(mask.float().mean().item() - prob) < 0.01, (size, block_size, prob)


def test_element_and_shared_masks_realise_prob():
    gen = torch.Generator().manual_seed(0)
    assert abs(element_mask((64, 64, 14, 14), 0.1, generator=gen).float().mean().item() - 0.1) < 0.002
    shared = block_mask(512, 1, 14, 14, 0.1, 7, generator=gen)
    assert abs(shared.float().mean().item() - 0.1) < 0.01


@pytest.mark.parametrize('block_size,shared', [(None, False), (5, False), (5, True)])
def test_op_realises_prob_and_preserves_the_mean(block_size, shared):
    torch.manual_seed(0)
    x = torch.rand(128, 16, 14, 14) + 0.5  # positive features with mean 1.0
    m = FeatureMapDistortion(0.15, gamma=2.0) if block_size is None else \
        BlockFeatureMapDistortion(0.15, block_size, shared_mask=shared, gamma=2.0)
    m.link(nn.Conv2d(16, 8, 3, padding=1))
    fractions, means = [], []
    for _ in range(20):
        out = m(x)
        fractions.append(m.realised_fraction())
        means.append(out.mean().item())
    assert abs(sum(fractions) / 20 - 0.15) < 0.01
    # the distortion is zero-mean and kept elements are rescaled: mean(out) = mean(x) = 1.0 in expectation
    assert abs(sum(means) / 20 - x.mean().item()) < 0.01


# ----------------------------------------------------------------------------------------------
# module contract
def test_eval_and_zero_prob_return_the_input_object():
    x = torch.randn(2, 4, 8, 8)
    m = BlockFeatureMapDistortion(0.2, 3)
    m.eval()
    assert m(x) is x
    assert feature_map_distortion(x, 0.0) is x
    assert feature_map_distortion(x, 0.3, training=False) is x
    ramped = FeatureMapDistortion(0.2, ramp_steps=10)
    with pytest.warns(UserWarning, match=r'FeatureMapDistortion\(ramp_steps=10\) is in no model whose optimiser '
                                         r'steps are counted'):
        assert ramped(x) is x  # the ramp starts at 0


def test_state_dict_is_empty_and_next_layer_is_not_a_submodule():
    layer = nn.Conv2d(4, 8, 3)
    m = BlockFeatureMapDistortion(0.1, 3, next_layer=layer)
    assert m.state_dict() == {}
    assert list(m.children()) == []
    assert m.next_layer is layer


def test_extra_repr_shows_settings_and_realised_fraction():
    m = BlockFeatureMapDistortion(0.1, 5, shared_mask=True, gamma=30.0, next_layer=nn.Conv2d(4, 4, 3))
    text = repr(m)
    for part in ('prob=0.1', 'block_size=5', 'shared_mask=True', 'gamma=30', 'mode=approx', 'next_layer=Conv2d'):
        assert part in text
    m(torch.randn(8, 4, 14, 14))
    assert 'realised=0.' in repr(m)
    assert m.expected_fraction(14, 14) == pytest.approx(0.1, abs=1e-6)


@pytest.mark.parametrize('shared', [False, True])
def test_layouts_agree(shared):
    """The same map in NCHW and NHWC memory/logical layouts gives the same distortion."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 9, 9)
    layer = nn.Conv2d(5, 4, 3, padding=1)
    kw = dict(block_size=3, next_layer=layer, mode='exact', gamma=2.0, shared_mask=shared)
    a = feature_map_distortion(x, 0.2, generator=torch.Generator().manual_seed(0), **kw)
    b = feature_map_distortion(x.permute(0, 2, 3, 1), 0.2, layout='NHWC',
                               generator=torch.Generator().manual_seed(0), **kw)
    c = feature_map_distortion(x.contiguous(memory_format=torch.channels_last), 0.2,
                               generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(a, b.permute(0, 3, 1, 2))
    torch.testing.assert_close(a, c)
    assert c.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_in_same_dtype_out(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 10, 10)
    layer = nn.Conv2d(6, 8, 3, padding=1)
    for mode in ('approx', 'exact'):
        out = feature_map_distortion(x.to(dtype), 0.2, block_size=3, mode=mode, next_layer=layer)
        assert out.dtype == dtype and torch.isfinite(out.float()).all()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = layer(x)
        out = feature_map_distortion(y, 0.2, block_size=3, mode='exact', next_layer=nn.Conv2d(8, 8, 1))
    assert y.dtype == torch.bfloat16 and out.dtype == torch.bfloat16


def test_deterministic_under_seed_and_generator():
    x = torch.randn(4, 6, 10, 10)
    layer = nn.Conv2d(6, 8, 3, padding=1)
    run = lambda **kw: feature_map_distortion(x, 0.2, block_size=3, next_layer=layer, **kw)  # noqa: E731
    torch.manual_seed(5)
    a = run()
    torch.manual_seed(5)
    assert torch.equal(a, run())
    assert torch.equal(run(generator=torch.Generator().manual_seed(1)), run(generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(run(generator=torch.Generator().manual_seed(1)), run(generator=torch.Generator().manual_seed(2)))


def test_block_larger_than_map_and_next_layer_wrappers():
    from timm.layers import Conv2dSame, ConvNormAct, StdConv2d
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 6)
    for layer in (Conv2dSame(4, 6, 3, stride=2), StdConv2d(4, 6, 3, padding=1), ConvNormAct(4, 6, 3)):
        out = feature_map_distortion(x, 0.3, block_size=9, mode='exact', next_layer=layer)
        assert out.shape == x.shape and torch.isfinite(out).all()
    # a block at least as large as the map covers it whole: each (sample, channel) is all in or all out
    mask = block_mask(64, 4, 5, 6, 0.3, 9)
    per_map = mask.float().mean((2, 3))
    assert ((per_map == 0) | (per_map == 1)).all()


def test_wrapper_next_layer_matches_its_own_forward():
    """The autograd path for wrapped convs gives the same exact distortion as the plain conv it wraps."""
    from timm.layers import ConvNormAct
    torch.manual_seed(0)
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    wrapped = ConvNormAct(4, 6, 3).double()
    mask = block_mask(4, 4, 8, 8, 0.3, 3)
    kw = dict(mode='exact', mask=mask, gamma=1.0)
    a = feature_map_distortion(x, 0.3, next_layer=wrapped, generator=torch.Generator().manual_seed(0), **kw)
    b = feature_map_distortion(x, 0.3, next_layer=wrapped.conv, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(a, b)

    class OwnForward(nn.Conv2d):  # forces the module (autograd) path
        def forward(self, t):
            return super().forward(t)

    own = OwnForward(4, 6, 3, padding=1, groups=2).double()
    plain = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    plain.load_state_dict(own.state_dict())
    a = feature_map_distortion(x, 0.3, next_layer=own, generator=torch.Generator().manual_seed(0), **kw)
    b = feature_map_distortion(x, 0.3, next_layer=plain, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(a, b)


def test_torch_compile_forward_backward():
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 8, 3, padding=1)
    m = BlockFeatureMapDistortion(0.2, 3, next_layer=layer, mode='exact')
    x = torch.randn(4, 6, 10, 10, requires_grad=True)
    compiled = torch.compile(m, backend='aot_eager', fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert out.shape == x.shape and torch.isfinite(x.grad).all()
    kept = x.grad != 0
    assert 0.6 < kept.float().mean().item() < 0.95  # gradients flow through kept elements only


# ----------------------------------------------------------------------------------------------
# bad input
@pytest.mark.parametrize('kwargs,exc,match', [
    (dict(prob=1.0), ValueError, r'prob must be in \[0, 1\), got 1.0'),
    (dict(prob=-0.1), ValueError, r'prob must be in \[0, 1\)'),
    (dict(prob=float('nan')), ValueError, r'prob must be in \[0, 1\)'),
    (dict(prob='0.1'), TypeError, r'prob must be a float'),
    (dict(prob=True), TypeError, r'prob must be a float'),
    (dict(block_size=0), ValueError, r'block_size must be an int >= 1, got 0'),
    (dict(block_size=2.5), TypeError, r'block_size must be an int >= 1, got 2.5'),
    (dict(gamma=-1.0), ValueError, r'gamma must be a finite float >= 0, got -1.0'),
    (dict(gamma=float('inf')), ValueError, r'gamma must be a finite float >= 0'),
    (dict(lam=float('nan')), ValueError, r'lam must be a finite float >= 0'),
    (dict(steps=0), ValueError, r'steps must be an int >= 1, got 0'),
    (dict(mode='fast'), ValueError, r"mode must be one of \('approx', 'exact'\), got 'fast'"),
    (dict(layout='NCL'), ValueError, r"layout 'NCL' needs a 3-dim tensor, got a 4-dim tensor"),
    (dict(next_layer=nn.Conv2d(5, 4, 3)), ValueError, r'next_layer expects 5 input channels .* has 4 channels'),
    (dict(next_layer=torch.randn(4, 5)), ValueError, r'next_layer expects 5 input channels'),
    (dict(next_layer=torch.randn(4, 4, 3)), ValueError, r'next_layer weight must have shape'),
    (dict(next_layer=nn.ReLU()), TypeError, r'next_layer must be an nn.Linear, an nn.Conv2d or a module'),
    (dict(next_layer=torch.randn(8, 4, 3, 3), mode='exact'), ValueError, r"mode='exact' needs next_layer as a module"),
    (dict(mask=torch.zeros(2, 4, 3, 3, dtype=torch.bool)), ValueError, r'mask must be a bool tensor of shape'),
    # only the channel dim may be 1: a (B, C, 1, 1) mask would mean other positions on CPU and on GPU
    (dict(mask=torch.ones(2, 4, 1, 1, dtype=torch.bool)), ValueError, r'mask must be a bool tensor of shape'),
    (dict(mask=torch.ones(1, 4, 8, 8, dtype=torch.bool)), ValueError, r'mask must be a bool tensor of shape'),
])
def test_bad_input_is_named(kwargs, exc, match):
    x = torch.randn(2, 4, 8, 8)
    kwargs = {'prob': 0.1, 'block_size': 3, **kwargs}
    with pytest.raises(exc, match=match):
        feature_map_distortion(x, **kwargs)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r'x must have shape \(B, C\), \(B, N, C\) or \(B, C, H, W\); got a 5-dim'):
        feature_map_distortion(torch.randn(2, 3, 4, 4, 4), 0.1)
    with pytest.raises(ValueError, match='block_size needs a feature map with 2 spatial dims'):
        feature_map_distortion(torch.randn(2, 5, 8), 0.1, block_size=3)
    with pytest.raises(ValueError, match='a conv next layer needs a \\(B, C, H, W\\) feature map'):
        feature_map_distortion(torch.randn(2, 5, 8), 0.1, next_layer=nn.Conv2d(8, 4, 1))
    with pytest.raises(ValueError, match='prob must be in'):
        FeatureMapDistortion(1.5)
    with pytest.raises(ValueError, match='ramp_steps must be an int >= 0'):
        FeatureMapDistortion(0.1, ramp_steps=-1)
    with pytest.raises(TypeError, match='shared_mask must be a bool'):
        BlockFeatureMapDistortion(0.1, 3, shared_mask='yes')


def test_std_of_large_maps_is_estimated_from_a_strided_subset():
    """Above 2**18 elements std(f) comes from 2**18 evenly strided ones: relative standard error ~0.14%
    (1/sqrt(2 * 2**18)); asserted within 1% on maps with per-channel structure. Small maps are exact."""
    from timm_fmd.ops.distortion import STD_SAMPLE, _feature_std
    torch.manual_seed(0)
    for shape in ((16, 256, 32, 32), (32, 1024, 14, 14), (8, 2048, 7, 7)):
        x = torch.randn(shape) * torch.rand(1, shape[1], 1, 1) * 3 + torch.randn(1, shape[1], 1, 1)
        for t in (x, x.contiguous(memory_format=torch.channels_last)):
            assert t.numel() > STD_SAMPLE
            assert _feature_std(t).item() == pytest.approx(t.std().item(), rel=0.01)
    small = torch.randn(4, 64, 16, 16)
    assert _feature_std(small).item() == small.std().item()
