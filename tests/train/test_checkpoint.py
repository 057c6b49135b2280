import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from timm_fmd.train.checkpoint import (atomic_path, atomic_write, capture_rng, load_checkpoint, load_weights,
                                       restore_rng, save_checkpoint, save_weights, weights_for_saving)

META = dict(architecture='a', model='fmd_a', epoch='2', global_step='20', format='pt')


def test_atomic_write_replaces_whole_files_and_cleans_up(tmp_path):
    atomic_write(tmp_path / 'f.txt', 'one')
    atomic_write(tmp_path / 'f.txt', 'two')
    assert (tmp_path / 'f.txt').read_text() == 'two'
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / 'f.txt') as tmp:
            tmp.write_text('half')
            raise RuntimeError('crash while writing')
    assert (tmp_path / 'f.txt').read_text() == 'two' and os.listdir(tmp_path) == ['f.txt']


def test_weights_for_saving_handles_shared_and_strided_tensors(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3))
    model[1].weight = nn.Parameter(model[0].weight.t())  # tied and non-contiguous
    weights = weights_for_saving(model)
    save_weights(tmp_path / 'w.safetensors', weights, META)
    loaded, metadata = load_weights(tmp_path / 'w.safetensors')
    assert metadata == META and loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert (tmp_path / 'w.safetensors').stat().st_mode & 0o044  # follows the umask, not 0600


def test_checkpoint_pair_round_trip_with_weights_only(tmp_path):
    state = dict(epoch=2, global_step=20, optimizer={'state': {0: {'m': torch.ones(2)}}, 'groups': [{'lr': 0.1}]},
                 best=None, ranks=[dict(rng=capture_rng())])
    save_checkpoint(tmp_path, 'last', {'w': torch.arange(3.0)}, META, state)
    assert sorted(os.listdir(tmp_path)) == ['last.safetensors', 'last.state.pt']
    torch.load(tmp_path / 'last.state.pt', weights_only=True)  # plain data only
    weights, metadata, loaded = load_checkpoint(tmp_path)
    assert torch.equal(weights['w'], torch.arange(3.0)) and metadata['global_step'] == '20'
    assert loaded['optimizer']['groups'] == [{'lr': 0.1}] and loaded['global_step'] == 20
    with pytest.raises(ValueError, match='disagree'):
        save_checkpoint(tmp_path, 'last', {'w': torch.zeros(1)}, META, dict(state, global_step=21))


def test_a_save_interrupted_between_the_renames_is_completed(tmp_path):
    save_checkpoint(tmp_path, 'last', {'w': torch.zeros(1)}, META, dict(epoch=2, global_step=20))
    new_meta = dict(META, epoch='3', global_step='30')
    save_checkpoint(tmp_path / 'next', 'last', {'w': torch.ones(1)}, new_meta, dict(epoch=3, global_step=30))
    # the crash: new weights renamed into place, new state still in its .tmp file
    os.replace(tmp_path / 'next' / 'last.safetensors', tmp_path / 'last.safetensors')
    os.replace(tmp_path / 'next' / 'last.state.pt', tmp_path / 'last.state.pt.tmp')
    weights, _, state = load_checkpoint(tmp_path)
    assert weights['w'].item() == 1 and state['global_step'] == 30
    assert not (tmp_path / 'last.state.pt.tmp').exists()
    save_weights(tmp_path / 'last.safetensors', {'w': torch.ones(1)}, dict(META, epoch='4', global_step='40'))
    with pytest.raises(RuntimeError, match='does not match'):
        load_checkpoint(tmp_path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match='last.state.pt'):
        load_checkpoint(tmp_path)


def test_rng_capture_restore_round_trip(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    np.random.normal()  # leaves a cached gaussian in NumPy's state
    saved = capture_rng()
    torch.save(saved, tmp_path / 'rng.pt')
    expected = (torch.rand(3), random.random(), np.random.normal())
    restore_rng(torch.load(tmp_path / 'rng.pt', weights_only=True))
    again = (torch.rand(3), random.random(), np.random.normal())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_cuda_rng_is_captured_per_device_and_restored_onto_another_index(fake_cuda, tmp_path):
    """A rank on cuda:1 saves cuda:1's generator only; resumed on a rank whose GPU is cuda:0, the same stream
    continues there (fake_cuda: CPU generators stand in for the two devices' default generators)."""
    gen0, gen1 = fake_cuda.generators
    gen0.manual_seed(1)
    gen1.manual_seed(2)
    torch.rand(5, generator=gen1)  # some masks already drawn
    torch.save(capture_rng(torch.device('cuda', 1)), tmp_path / 'rng.pt')
    expected = torch.rand(4, generator=gen1)
    restore_rng(torch.load(tmp_path / 'rng.pt', weights_only=True), torch.device('cuda', 0))
    assert torch.equal(torch.rand(4, generator=gen0), expected)
    assert not torch.equal(torch.rand(4, generator=gen1), expected)  # cuda:1 went on with its own stream
    before = [g.get_state() for g in fake_cuda.generators]
    restore_rng(torch.load(tmp_path / 'rng.pt', weights_only=True), torch.device('cpu'))  # a CPU run: no CUDA
    assert all(torch.equal(g.get_state(), b) for g, b in zip(fake_cuda.generators, before))
    with pytest.raises(ValueError, match='a CUDA generator needs an indexed device such as cuda:0, got cuda'):
        capture_rng(torch.device('cuda'))


def test_cpu_rng_state_resumed_on_cuda_seeds_the_device_per_rank(fake_cuda, monkeypatch):
    """A checkpoint made on the CPU holds no CUDA stream: each rank's device generator is then seeded from
    that rank's restored CPU state (deterministic, and distinct per rank)."""
    monkeypatch.setattr(torch.cuda, 'init', lambda: pytest.fail('capture on the CPU must not touch CUDA'))
    states = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        states.append(capture_rng())
    assert all(s['cuda'] is None for s in states)
    monkeypatch.setattr(torch.cuda, 'init', lambda: None)
    draws = []
    for state in states:
        restore_rng(state, torch.device('cuda', 1))
        draws.append(torch.rand(4, generator=fake_cuda.generators[1]))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    restore_rng(dict(states[0], cuda=[]), torch.device('cuda', 1))  # checkpoints before per-device capture
    assert torch.equal(torch.rand(4, generator=fake_cuda.generators[1]), draws[0])
