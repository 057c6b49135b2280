"""The fused path on a real GPU (``python -m pytest -m cuda``; skipped without CUDA).

The interpreter tests beside this file check the kernels' logic on CPU; these check the compiled kernels:
equality with the reference given the kernels' own mask and noise, the distribution of the realised fraction,
inductor and CUDA graphs, and that the backward pass keeps no mask.
"""
import pytest
import torch
import torch.nn as nn

from timm_fmd.ops import fused
from timm_fmd.ops.distortion import BlockFeatureMapDistortion, _distort
from timm_fmd.ops.masks import block_mask

from ..test_graph import check_compiles_again_with_other_settings
from .test_fused import (TILINGS, _check_against_reference, _report, check_draws_do_not_depend_on_the_tiling,
                         check_gradient_of_the_gradient)

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize('block_size,shared', [(None, False), (7, False), (7, True), (4, False)])
@pytest.mark.parametrize('mode', ['approx', 'exact'])
@pytest.mark.parametrize('dtype,channels_last', [(torch.float32, False), (torch.bfloat16, True),
                                                 (torch.float16, True)])
def test_fused_matches_the_reference_on_cuda(block_size, shared, mode, dtype, channels_last):
    torch.manual_seed(0)
    x = torch.randn(8, 64, 14, 14, device='cuda')
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    layer = nn.Conv2d(64, 32, 3, padding=1).cuda()
    _check_against_reference(x.to(dtype), 0.1, mode=mode, next_layer=layer, block_size=block_size, shared=shared)


@pytest.mark.parametrize('size,block_size,tile,packed', TILINGS)
def test_compiled_draws_do_not_depend_on_the_tiling(size, block_size, tile, packed, monkeypatch):
    """The interpreter test of the same name, compiled: packed draws (join + reshape) as per-element ones."""
    check_draws_do_not_depend_on_the_tiling(size, block_size, tile, packed, torch.device('cuda'), monkeypatch)


def test_tokens_match_the_reference_on_cuda():
    torch.manual_seed(1)
    x = torch.randn(8, 197, 96, device='cuda', dtype=torch.bfloat16)
    _check_against_reference(x, 0.1, layout='NLC', mode='exact', next_layer=nn.Linear(96, 48).cuda())


@pytest.mark.parametrize('backend', [None, 'eager'])
def test_gradient_of_the_gradient_on_cuda(backend):
    check_gradient_of_the_gradient(torch.device('cuda'), backend)


def test_realised_fraction_is_distributed_as_the_reference():
    """Over 200 calls at prob 0.1, block 7, per-channel masks on 14x14 maps: the mean realised fraction is prob
    (to 4 standard errors) and its spread matches the reference masks' spread (within 25%)."""
    shape = (16, 128, 14, 14)
    x = torch.randn(shape, device='cuda', dtype=torch.bfloat16)
    torch.manual_seed(2)
    ours = torch.stack([_distort(x, 0.1, gamma=1.0, lam=0.0, steps=1, mode='approx', next_layer=None, block_size=7,
                                 shared_mask=False, layout=None, generator=None, mask=None)[1] for _ in range(200)])
    ref = torch.stack([block_mask(*shape, 0.1, 7, device='cuda').float().mean() for _ in range(200)])
    assert abs(ours.mean().item() - 0.1) < 4 * ref.std().item() / 200 ** 0.5
    assert 0.75 < ours.std().item() / ref.std().item() < 1.25


def test_compiles_again_with_other_settings_on_cuda():
    torch.manual_seed(0)
    check_compiles_again_with_other_settings(torch.randn(2, 6, 9, 9, device='cuda'),
                                             nn.Conv2d(6, 8, 3, padding=1).cuda())


@pytest.mark.parametrize('mode', ['default', 'reduce-overhead'])
def test_compiles_with_inductor_and_replays_new_masks(mode, monkeypatch):
    """Inductor, and its CUDA-graph trees: a new seed per call, replays included. The seed-rate table of the
    map size is made inside the compiled call (no table cached by an earlier test: on the H200 a table first made
    inside the graph trees' memory pool failed their check)."""
    from timm_fmd.ops import masks
    monkeypatch.setattr(masks, '_RATE_TABLES', {})
    torch.manual_seed(3)
    layer = nn.Conv2d(64, 32, 3, padding=1).cuda()
    m = BlockFeatureMapDistortion(0.1, 7, next_layer=layer, mode='exact').cuda()
    compiled = torch.compile(m, mode=None if mode == 'default' else mode, fullgraph=True)
    x = torch.randn(8, 64, 14, 14, device='cuda', requires_grad=True)
    masks = []
    for _ in range(4):
        out = compiled(x)
        out.backward(torch.ones_like(out))
        masks.append((x.grad == 0).clone())
        x.grad = None
    for a, b in zip(masks, masks[1:]):
        assert not torch.equal(a, b)  # a new seed each call, replays of a CUDA graph included
    for mask in masks:
        assert 0.05 < mask.float().mean().item() < 0.15


def test_cuda_graph_capture_draws_a_new_mask_per_replay():
    m = BlockFeatureMapDistortion(0.1, 7).cuda()
    x = torch.randn(8, 64, 14, 14, device='cuda')
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: kernels compiled, seed-rate table uploaded
            m(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = m(x)
    graph.replay()
    first, first_fraction = out.clone(), float(m.last_fraction)
    graph.replay()
    assert not torch.equal(first, out)  # the replay advanced torch's generator: a new seed, a new mask
    for fraction in (first_fraction, float(m.last_fraction)):
        assert 0.05 < fraction < 0.15


def test_backward_keeps_no_mask():
    x = torch.randn(32, 256, 14, 14, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = BlockFeatureMapDistortion(0.1, 7).cuda()(x)
    assert sum(t.numel() * t.element_size() for t in saved) < 1024  # a seed and 4 floats (+ a 0-dim prob)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    # the backward allocates the upstream-independent gradient only: no mask, no keep tensor
    assert torch.cuda.max_memory_allocated() - base <= 2 * x.numel() * x.element_size() + (1 << 20)
    assert fused.applies(x, lam=0.0, steps=1, mask=None, noise=None)


def test_direct_launches_equal_launches_through_triton(monkeypatch):
    """After a key's first launch the compiled kernels are called directly (``timm_fmd.ops.launch``): the same
    outputs and gradients, bit for bit, as launches through ``kernel[grid]``, on an aligned and a misaligned map,
    with Triton binding each kernel's launch once per key."""
    from timm_fmd.ops import kernels

    through_triton = []

    class Counting:  # one object per kernel for the whole test: the launchers stay cached
        def __init__(self, kernel):
            self.kernel = kernel

        def __getattr__(self, name):
            return getattr(self.kernel, name)

        def __getitem__(self, grid):
            through_triton.append(self.kernel)
            return self.kernel[grid]

    for name in ('fmd_stats_kernel', 'fmd_apply_kernel', 'fmd_grad_kernel'):
        monkeypatch.setattr(kernels, name, Counting(getattr(kernels, name)))
    module = BlockFeatureMapDistortion(0.1, 3, next_layer=nn.Conv2d(16, 8, 3, padding=1).cuda())
    shape = (4, 16, 12, 12)
    n = torch.Size(shape).numel()
    maps = [torch.randn(shape, device='cuda'), torch.randn(n + 1, device='cuda')[1:].view(shape)]  # 4 bytes past
    grad = torch.randn(shape, device='cuda')
    for x in maps:
        results = []
        for _ in range(3):
            torch.manual_seed(0)
            leaf = x.detach().requires_grad_()  # same storage, same offset
            out = module(leaf)
            out.backward(grad)
            results.append((out, leaf.grad))
        for out, dx in results[1:]:
            assert torch.equal(out, results[0][0]) and torch.equal(dx, results[0][1])
    assert len(through_triton) == 3 + 2  # aligned: 3 kernels; misaligned map: stats and apply (the gradient is aligned)
