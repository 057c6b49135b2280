"""The ramp counts optimiser steps (timm_fmd.ops.schedule), on a model assembled from the op by hand.

Whole timm models (torch.compile, activation checkpointing, EMA, DDP, timm's train.py) are in tests/test_ramp.py.
"""
import copy
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
from timm.optim import Lookahead
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.checkpoint import checkpoint

from timm_fmd.ops.distortion import FeatureMapDistortion
from timm_fmd.ops.schedule import (_COUNTED, LinearRamp, count_steps, current_prob, schedule_step,
                                   set_schedule_step, step_schedule)

TARGET, RAMP = 0.2, 10


def _net(ramp_steps: int = RAMP) -> nn.Sequential:
    """conv -> FMD -> linear head, counted from step 0 (set_schedule_step starts a hand-built model's count)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), FeatureMapDistortion(TARGET, ramp_steps=ramp_steps),
                        nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    set_schedule_step(net, 0)
    return net


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8)


def _iteration(net: nn.Module, *optimizers: torch.optim.Optimizer, forwards: int = 1) -> None:
    """``forwards`` forward/backward passes (gradient accumulation), then every optimiser steps once."""
    for _ in range(forwards):
        net(_x()).sum().backward()
    for opt in optimizers:
        opt.step()
        opt.zero_grad()


def test_linear_ramp_values():
    ramp = LinearRamp(0.2, 4)
    assert [ramp.value(k) for k in range(6)] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2])
    assert LinearRamp(0.3, 0).value(0) == 0.3
    with pytest.raises(ValueError, match='ramp_steps must be an int >= 0, got -1'):
        LinearRamp(0.1, -1)


def test_optimiser_steps_advance_the_ramp_and_forwards_do_not():
    net = _net()
    op = net[1]
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(5):
        net(_x())
    net.eval()(_x())
    net.train()
    assert schedule_step(net) == 0 and current_prob(net) == 0.0 and net(_x()) is not None
    for _ in range(3):
        _iteration(net, opt)
    assert schedule_step(net) == 3 and current_prob(net) == TARGET * 3 / RAMP
    assert op.prob_now.dtype == torch.float32 and op.prob_now.item() == pytest.approx(0.06, rel=1e-6)
    assert 'current=0.06 (ramp 3/10)' in repr(op)
    set_schedule_step(net, RAMP)
    net(torch.randn(64, 3, 8, 8))  # 4,096 elements: the realised fraction is within 6 standard errors (0.037) of 0.2
    assert op.realised_fraction() == pytest.approx(TARGET, abs=0.037)


def test_gradient_accumulation_counts_the_step_not_the_forwards():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    _iteration(net, opt, forwards=4)
    assert schedule_step(net) == 1


def test_which_optimisers_count():
    net = _net()
    body = torch.optim.SGD(net[0].parameters(), lr=0.01)
    head = torch.optim.AdamW(net[3].parameters(), lr=0.01)
    for _ in range(3):  # two optimisers on disjoint parts of one model: one step per iteration
        _iteration(net, body, head)
    assert schedule_step(net) == 3
    del body, head  # a new stage of training: the earlier optimisers are gone
    net[0].requires_grad_(False)
    head_only = torch.optim.SGD(net[3].parameters(), lr=0.01)  # fine-tuning the head: still counts
    for _ in range(2):
        _iteration(net, head_only)
    assert schedule_step(net) == 5
    other = nn.Linear(3, 3)
    torch.optim.SGD(other.parameters(), lr=0.01).step()  # another model's optimiser
    assert schedule_step(net) == 5


def test_a_new_optimiser_beside_a_live_one_first_joins_its_step():
    net = _net()
    first, second = (torch.optim.SGD(net.parameters(), lr=0.01) for _ in range(2))
    _iteration(net, first)
    _iteration(net, second)  # could be a second optimiser of the same iteration: one behind, as documented
    assert schedule_step(net) == 1
    _iteration(net, second)
    assert schedule_step(net) == 2


def test_an_optimiser_counts_once_its_param_groups_hold_the_model():
    net, other = _net(), nn.Linear(3, 3)
    opt = torch.optim.SGD(other.parameters(), lr=0.01)
    opt.step()
    assert schedule_step(net) == 0
    opt.add_param_group({'params': list(net[3].parameters())})
    opt.step()
    assert schedule_step(net) == 1


def test_a_step_nested_in_another_optimisers_step_counts_once():
    """timm's Lookahead (``--opt lookahead_sgd``) runs its base optimiser's step inside its own, and both fire
    the step hooks (its own once torch has patched it, from its first zero_grad), as ZeroRedundancyOptimizer's
    outer and local steps do."""
    net = _net()
    opt = Lookahead(torch.optim.SGD(net.parameters(), lr=0.01))
    fired = []
    handle = register_optimizer_step_post_hook(lambda *args: fired.append(1))
    try:
        for _ in range(3):
            _iteration(net, opt)
    finally:
        handle.remove()
    assert len(fired) > 3 and schedule_step(net) == 3  # the hooks fired more than once an iteration


def test_a_step_gradscaler_skips_is_not_counted():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler('cpu')
    for factor in (float('inf'), 1.0, 1.0):  # inf gradients: scaler.step skips optimizer.step()
        scaler.scale(net(_x()).sum() * factor).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert schedule_step(net) == 2 and scaler.get_scale() == 2.0 ** 15


def test_resume_and_manual_driving():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    set_schedule_step(net, 7)  # resume
    assert schedule_step(net) == 7 and current_prob(net) == TARGET * 7 / RAMP
    _iteration(net, opt)
    assert schedule_step(net) == 8
    set_schedule_step(net, 100)
    assert current_prob(net) == TARGET and net[1].prob_now.item() == pytest.approx(TARGET)
    step_schedule(net, 0)  # a loop without a torch optimiser drives it by hand from now on
    set_schedule_step(net, 2)
    step_schedule(net, 3)
    _iteration(net, opt)  # no longer counted: never twice
    assert schedule_step(net) == 5 and net[1].ramp.driver == 'manual'


def test_bad_counts_are_errors():
    net = _net()
    with pytest.raises(ValueError, match=r'n must be an int >= 0, got -1'):
        step_schedule(net, -1)
    with pytest.raises(ValueError, match=r'step must be an int >= 0, got 1.5'):
        set_schedule_step(net, 1.5)
    with pytest.raises(ValueError, match=r'step must be an int >= 0, got True'):
        set_schedule_step(net, True)


def test_dtype_conversion_keeps_the_ramp_exact():
    net = _net(ramp_steps=3000).to(torch.bfloat16)  # bfloat16 holds integers exactly only up to 256
    op = net[1]
    assert (op.ramp_count.dtype, op.prob_now.dtype) == (torch.int64, torch.float32)
    assert net[0].weight.dtype == torch.bfloat16
    set_schedule_step(net, 1000)
    torch.optim.SGD(net.parameters(), lr=0.01).step()
    assert schedule_step(net) == 1001 and op.prob_now.item() == pytest.approx(TARGET * 1001 / 3000, rel=1e-6)
    net.half()
    assert op.prob_now.dtype == torch.float32 and op.prob_now.item() == pytest.approx(TARGET * 1001 / 3000, rel=1e-6)


def test_an_uncounted_op_warns_until_its_model_is_counted():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), FeatureMapDistortion(TARGET, ramp_steps=RAMP))
    with pytest.warns(UserWarning, match=r'call timm_fmd.set_schedule_step\(model, 0\) on the model that holds it'):
        net(_x())
    set_schedule_step(net, 0)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        net(_x())
    torch.optim.SGD(net.parameters(), lr=0.01).step()
    assert schedule_step(net) == 1


def test_counting_ends_with_the_ops_or_the_model():
    net = _net()
    del net[1]  # the op is gone: counting it again lists no op, and drops the model
    count_steps(net)
    assert net not in _COUNTED and not net._forward_pre_hooks
    net = _net()
    torch.optim.SGD(net.parameters(), lr=0.01).step()
    assert net in _COUNTED
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None  # the registry keeps no model alive


def test_a_deep_copy_counts_its_own_optimiser_steps():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    _iteration(net, opt)
    twin = copy.deepcopy(net)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01)
    _iteration(twin, twin_opt)  # its first training forward starts its count (from the copied position)
    _iteration(twin, twin_opt)
    assert (schedule_step(net), schedule_step(twin)) == (1, 3)
    _iteration(net, opt)
    assert (schedule_step(net), schedule_step(twin)) == (2, 3)
    copied = copy.deepcopy(net)  # set_schedule_step starts a copy's count without a forward
    set_schedule_step(copied, 0)
    torch.optim.SGD(copied.parameters(), lr=0.01).step()
    assert (schedule_step(net), schedule_step(copied)) == (2, 1)


def test_checkpointing_recomputes_the_same_mask():
    torch.manual_seed(0)
    op = FeatureMapDistortion(0.3)
    x = torch.randn(4, 4, 8, 8)
    grads = []
    for checkpointed in (False, True):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        out = checkpoint(op, xi, use_reentrant=False) if checkpointed else op(xi)
        (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1]) and (grads[0] == 0).float().mean() > 0.2  # same distorted elements
    op.generator = torch.Generator().manual_seed(0)  # not restored by checkpoint: an error, not another mask
    with pytest.raises(RuntimeError, match=r'generator is set, and this forward runs inside a backward pass'):
        checkpoint(op, x.clone().requires_grad_(True), use_reentrant=False).sum().backward()


def test_a_compiled_training_step_has_no_graph_break():
    net = _net()
    compiled = torch.compile(net, backend='aot_eager', fullgraph=True)  # the counter's pre-hook included
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(2):
        compiled(_x()).sum().backward()
        opt.step()
        opt.zero_grad()
    assert schedule_step(net) == 2


def test_the_forward_reads_the_probability_as_a_tensor_off_the_cpu():
    op = FeatureMapDistortion(TARGET, ramp_steps=RAMP)
    set_schedule_step(op, 5)
    assert op._forward_prob() == TARGET * 5 / RAMP  # a float on the CPU: the host seed-rate cache, the p == 0 shortcut
    op.to('meta')  # any other device (a GPU): the buffer itself, so the forward never synchronises
    assert op._forward_prob() is op.prob_now and op.prob_now.device.type == 'meta'
    assert FeatureMapDistortion(TARGET).to('meta')._forward_prob() == TARGET  # no ramp: the target, on any device
