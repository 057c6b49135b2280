"""The FMD ramp of whole timm models counts optimiser steps however the forward runs: torch.compile,
activation checkpointing, EMA copies, DDP, CUDA graphs, and a driver that does what timm's train.py does.

Unit cases on a hand-built model (accumulation, several optimisers, GradScaler, dtypes, manual driving) are
in tests/ops/test_schedule.py.
"""
import argparse
import importlib
import os
import socket

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, ParseKwargs

import timm_fmd
from timm_fmd import current_prob, fmd_ops, schedule_step, set_schedule_step

SMALL = dict(fmd_input_size=(3, 32, 32))  # the probe forward that finds the sites, at the size the tests train


def _step(model, opt, x, forward=None) -> torch.Tensor:
    loss = F.cross_entropy((model if forward is None else forward)(x), torch.arange(len(x)) % 3)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def test_compiled_model_counts_optimiser_steps_without_recompiling():
    """The issue's example: 12 steps of a compiled fmd_resnet18 with a 10-step ramp end at 12 and 0.1
    (compiled forwards used to leave the ramp at 0, silently)."""
    graphs = []

    def counting_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend('aot_eager')(gm, example_inputs)

    torch.manual_seed(0)
    model = timm.create_model('fmd_resnet18', fmd_prob=0.1, fmd_ramp_steps=10, fmd_input_size=(3, 64, 64)).train()
    compiled = torch.compile(model, backend=counting_aot_eager)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 3, 64, 64)
    compiled(x)
    compiled(x)  # forwards alone never move the ramp
    assert (schedule_step(model), current_prob(model)) == (0, 0.0)
    probs = []
    for i in range(12):
        _step(model, opt, x, compiled)
        if i == 0:
            first = len(graphs)
        probs.append(current_prob(model))
    assert schedule_step(model) == 12 and current_prob(model) == pytest.approx(0.1)
    assert probs == pytest.approx([0.1 * min(k, 10) / 10 for k in range(1, 13)])
    assert len(graphs) == first  # the rising ramp compiles nothing new


def test_grad_checkpointing_recomputes_the_same_forward():
    """set_grad_checkpointing(True): no CheckpointError, one count per step, and the losses and gradients of a
    model without checkpointing from the same seed (the recompute draws the same masks with the same p)."""
    runs = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = timm.create_model('fmd_resnet18', fmd_prob=0.2, fmd_ramp_steps=2, **SMALL).train()
        model.set_grad_checkpointing(checkpointed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = [_step(model, opt, torch.randn(4, 3, 32, 32)) for _ in range(3)]
        loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4) % 3)
        loss.backward()  # a fourth backward at the full p, gradients kept
        fractions = [op.realised_fraction() for _, op in fmd_ops(model)]
        runs.append((losses, [p.grad for p in model.parameters()], fractions, schedule_step(model)))
    (losses, grads, fractions, steps), (ck_losses, ck_grads, ck_fractions, ck_steps) = runs
    assert steps == ck_steps == 3
    assert min(fractions) > 0 and fractions == ck_fractions
    assert torch.equal(torch.stack(losses), torch.stack(ck_losses))
    for g, ck in zip(grads, ck_grads):
        torch.testing.assert_close(ck, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('exclude_buffers', [False, True])
def test_ema_copies_never_move_the_model(exclude_buffers):
    """timm's ModelEmaV3 keeps a deep copy in eval mode: its forwards never move the model's ramp. Its own count
    stays at the copy's start by default (ramp buffers are not in the state_dict it averages), and follows the
    model's with exclude_buffers=True (which copies every buffer)."""
    torch.manual_seed(0)
    model = timm.create_model('fmd_test_resnet', num_classes=3, fmd_ramp_steps=10, **SMALL).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ema = ModelEmaV3(model, decay=0.9, exclude_buffers=exclude_buffers)
    for step in range(1, 4):
        _step(model, opt, torch.randn(2, 3, 32, 32))
        ema.update(model, step=step)
        ema.module(torch.randn(2, 3, 32, 32))
    assert not ema.module.training and schedule_step(model) == 3
    assert schedule_step(ema.module) == (3 if exclude_buffers else 0)


def _ddp_worker(rank: int, port: int, results) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    torch.manual_seed(0)
    model = timm.create_model('fmd_test_resnet', num_classes=3, fmd_ramp_steps=10, **SMALL).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    torch.manual_seed(rank)
    for _ in range(3):  # three optimiser steps of two accumulated micro-batches each
        with ddp.no_sync():
            F.cross_entropy(ddp(torch.randn(2, 3, 32, 32)), torch.arange(2)).backward()
        _step(ddp, opt, torch.randn(2, 3, 32, 32))
    results[rank] = (schedule_step(model), current_prob(model))
    dist.destroy_process_group()


def test_ddp_ranks_count_their_own_steps():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    # spawn: this process has run autograd already, which a forked child cannot use
    mp.start_processes(_ddp_worker, args=(port, results), nprocs=2, start_method='spawn')
    assert dict(results) == {0: (3, pytest.approx(0.03)), 1: (3, pytest.approx(0.03))}


def test_timm_train_script_driver():
    """What timm's train.py does with --device-modules timm_fmd --model fmd_... --model-kwargs fmd_prob=0.1
    fmd_ramp_steps=10 --grad-checkpointing --grad-accum-steps 2 --model-ema --torchcompile (train.py is not in the
    timm wheel; its calls, in its order). 7 batches an epoch with 2 accumulated: 4 updates an epoch (the last one
    of a single batch), 8 in two epochs: the ramp's count."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    args = parser.parse_args(['--model-kwargs', 'fmd_prob=0.1', 'fmd_ramp_steps=10', 'fmd_input_size=(3,32,32)'])
    importlib.import_module('timm_fmd')  # --device-modules
    torch.manual_seed(0)
    model = timm.create_model('fmd_test_resnet', pretrained=False, num_classes=3, drop_rate=0.0,
                              drop_path_rate=None, drop_block_rate=None, global_pool=None, bn_momentum=None,
                              bn_eps=None, scriptable=False, checkpoint_path=None, **args.model_kwargs)
    model.set_grad_checkpointing(enable=True)
    model.to(device=torch.device('cpu'), dtype=None)
    optimizer = create_optimizer_v2(model, opt='sgd', lr=0.05, weight_decay=1e-4, momentum=0.9)
    ema = ModelEmaV3(model, decay=0.99)
    trainable = torch.compile(model, backend='aot_eager')
    accum, batches, epochs = 2, 7, 2
    updates_per_epoch = (batches + accum - 1) // accum
    lr_scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=epochs, warmup_epochs=0,
                                          step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    data = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 2])) for _ in range(batches)]
    num_updates = 0
    for epoch in range(epochs):
        trainable.train()
        last_accum_steps = batches % accum
        last_batch_idx_to_accum = batches - last_accum_steps
        accum_steps = accum
        optimizer.zero_grad()
        for batch_idx, (x, target) in enumerate(data):
            need_update = batch_idx == batches - 1 or (batch_idx + 1) % accum == 0
            if batch_idx >= last_batch_idx_to_accum:
                accum_steps = last_accum_steps
            loss = F.cross_entropy(trainable(x), target)
            if accum_steps > 1:
                loss /= accum_steps
            loss.backward()
            if not need_update:
                continue
            optimizer.step()
            num_updates += 1
            optimizer.zero_grad()
            ema.update(model, step=num_updates)
            lr_scheduler.step_update(num_updates=num_updates, metric=loss.item())
        lr_scheduler.step(epoch + 1, loss.item())
    assert num_updates == 8 and schedule_step(model) == 8 and current_prob(model) == pytest.approx(0.08)
    assert schedule_step(ema.module) == 0


@pytest.mark.cuda
def test_cuda_eager_steps_count_without_a_host_sync():
    torch.manual_seed(0)
    model = timm.create_model('fmd_test_resnet', num_classes=3, fmd_ramp_steps=4, **SMALL).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(2, 3, 32, 32, device='cuda')
    for _ in range(3):
        F.cross_entropy(model(x), torch.arange(2, device='cuda')).backward()
        torch.cuda.set_sync_debug_mode('error')  # the counting hook must not synchronise
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode('default')
        opt.zero_grad()
    op = fmd_ops(model)[0][1]
    assert op.ramp_count.device.type == 'cuda' and schedule_step(model) == 3
    assert op.prob_now.item() == pytest.approx(op.prob * 3 / 4)


@pytest.mark.cuda
def test_cuda_graph_replays_advance_the_ramp():
    """A captured training step (forward, backward, optimizer.step) advances the ramp at every replay."""
    torch.manual_seed(0)
    model = timm.create_model('fmd_test_resnet', num_classes=3, fmd_prob=0.2, fmd_ramp_steps=4, **SMALL).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(4, 3, 32, 32, device='cuda')
    y = torch.arange(4, device='cuda') % 3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs requires
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        F.cross_entropy(model(x), y).backward()
        opt.step()
    set_schedule_step(model, 0)  # in place: the captured kernels read and write the same buffers
    ops = [op for _, op in fmd_ops(model)]
    probs = []
    for _ in range(6):
        graph.replay()
        probs.append([op.prob_now.item() for op in ops])
    assert schedule_step(model) == 6
    assert probs == [[pytest.approx(op.prob * min(k, 4) / 4) for op in ops] for k in range(1, 7)]
