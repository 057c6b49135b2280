"""--cuda-graph: the refusals, and the capture/replay logic against eager steps.

On CPU the CUDA graph is replaced by ``RecordedGraph`` (graph_recorder.py): it records the aten ops of the
captured step and replays them with their capture-time scalars, as a CUDA graph replays kernels, and fails on
a host synchronisation. A trainer run through it must follow the eager run step for step: the scheduler's
learning rate, the EMA's decay schedule, BatchNorm statistics, dropout draws and the device-side sums.
"""
import contextlib
import dataclasses

import pytest
import torch
import torch.nn as nn

import timm
import timm_fmd.ops.capture as capture
from timm_fmd.train import fit
from timm_fmd.train import graphs, loop
from timm_fmd.train.checkpoint import load_weights
from timm_fmd.train.config import validate
from timm_fmd.train.graphs import CapturableEma, GraphedStep, check_graph_config
from timm_fmd.train.report import MetricsLog

from .conftest import quick_config
from .graph_recorder import HostSyncInCapture, RecordedGraph

CUDA = torch.device('cuda', 0)


@pytest.fixture
def recorded(monkeypatch):
    """``--cuda-graph`` runs on CPU with RecordedGraph in place of the CUDA graph; returns the graphs made."""
    made = []

    class Backend(RecordedGraph):
        def __init__(self, device):
            super().__init__(device)
            made.append(self)

    monkeypatch.setattr(graphs, 'CudaGraph', Backend)
    monkeypatch.setattr(loop, 'check_graph_config', lambda cfg, device, world_size, model: None)  # CPU stands in
    return made


# A recipe whose every step differs: per-step warm-up of a cosine schedule, the EMA's decay warm-up, dropout,
# weight decay, gradient clipping and momentum.
RECIPE = dict(epochs=2, model_kwargs={'drop_rate': 0.3}, sched='cosine', warmup_epochs=1, warmup_lr=0.005,
              sched_on_updates=True, weight_decay=5e-4, clip_grad=2.0, model_ema=True, model_ema_warmup=True,
              opt_kwargs={'fused': True}, train_crop_mode='pad', crop_pad=2, hflip=0.5)


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k not in ('images_per_sec', 'epoch_time_s') and v is not None}
            for r in MetricsLog.read(run_dir / 'metrics.csv').rows]


def _state(run_dir):
    """(trained weights, EMA weights) of the run's last checkpoint."""
    state = torch.load(run_dir / 'checkpoints' / 'last.state.pt', weights_only=True)
    return state['model'], load_weights(run_dir / 'checkpoints' / 'last.safetensors')[0]


def _close(a, b, atol):
    return all(torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=atol) for k in a)


@pytest.fixture(scope='module')
def eager_runs(tiny_data, tmp_path_factory):
    """The eager run of RECIPE per data path (run directories, made on first use)."""
    runs = {}

    def get(data_on_device=False):
        if data_on_device not in runs:
            out = tmp_path_factory.mktemp('eager')
            fit(quick_config(tiny_data, out, data_on_device=data_on_device, **RECIPE))
            runs[data_on_device] = out / 'run'
        return runs[data_on_device]
    return get


@pytest.mark.parametrize('data_on_device', [False, True])
def test_replayed_steps_follow_the_eager_run(eager_runs, tiny_data, tmp_path, recorded, data_on_device):
    """12 steps: 3 eager, 1 captured, 8 replayed. Metrics (from the device-side sums) and weights as eager, to
    float rounding (the graph's EMA computes ema + w * (model - ema) where timm's lerp may compute
    model - (model - ema) * (1 - w))."""
    eager_run = eager_runs(data_on_device)
    results = fit(quick_config(tiny_data, tmp_path, cuda_graph=True, data_on_device=data_on_device, **RECIPE))
    backend, = recorded
    assert backend.replays == 8 and results['global_steps'] == 12 and results['evaluated_weights'] == 'ema'
    eager, graphed = _rows(eager_run), _rows(tmp_path / 'run')
    assert [r['lr'] for r in graphed] == [r['lr'] for r in eager]
    for e, g in zip(eager, graphed):
        assert g == pytest.approx(e, rel=1e-5, abs=1e-6)
    (model_e, ema_e), (model_g, ema_g) = _state(eager_run), _state(tmp_path / 'run')
    assert _close(model_e, model_g, atol=1e-5) and _close(ema_e, ema_g, atol=1e-5)
    assert not _close(model_g, ema_g, atol=1e-3)  # the EMA is not a copy of the model


def test_a_compiled_model_is_captured_too(tiny_data, tmp_path, recorded):
    """--torchcompile with --cuda-graph (the fast path for small models: fused kernels, one launch per step): the
    compiled step is captured after the eager warm-up compiled it, and the replays follow the compiled eager run.
    aot_eager stands in for inductor here (its graphs run aten ops, which the recorder captures)."""
    recipe = dict(RECIPE, torchcompile='aot_eager')
    fit(quick_config(tiny_data, tmp_path / 'eager', **recipe))
    results = fit(quick_config(tiny_data, tmp_path / 'graph', cuda_graph=True, **recipe))
    backend, = recorded
    assert backend.replays == 8 and results['global_steps'] == 12
    for e, g in zip(_rows(tmp_path / 'eager' / 'run'), _rows(tmp_path / 'graph' / 'run')):
        assert g == pytest.approx(e, rel=1e-5, abs=1e-6)
    (model_e, ema_e), (model_g, ema_g) = _state(tmp_path / 'eager' / 'run'), _state(tmp_path / 'graph' / 'run')
    assert _close(model_e, model_g, atol=1e-5) and _close(ema_e, ema_g, atol=1e-5)


@pytest.mark.parametrize('frozen', ['learning rate', 'EMA weight'])
def test_a_value_frozen_at_capture_is_caught(eager_runs, tiny_data, tmp_path, recorded, monkeypatch, frozen):
    """The comparison above has teeth: read as host values at capture, the scheduler's learning rate or the
    EMA's weight stay at their capture-time values in every replay, and the run leaves the eager one."""
    if frozen == 'learning rate':
        monkeypatch.setattr(GraphedStep, '_tensor_lr', lambda self: contextlib.nullcontext())
    else:
        monkeypatch.setattr(graphs, 'capturing', lambda: False)  # the EMA then fills its weight during capture
    fit(quick_config(tiny_data, tmp_path, cuda_graph=True, **RECIPE))
    (model_e, ema_e), (model_g, ema_g) = _state(eager_runs()), _state(tmp_path / 'run')
    assert not _close(ema_e, ema_g, atol=1e-4)
    assert _close(model_e, model_g, atol=1e-5) == (frozen == 'EMA weight')


def _linear_step(model, optimizer):
    def step(x, target, y, global_step):
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return torch.stack([loss.detach().double() * len(y), torch.zeros((), dtype=torch.float64),
                            torch.zeros((), dtype=torch.float64)])
    return step


def test_static_buffers_and_sums():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    backend = RecordedGraph()
    step = GraphedStep(_linear_step(lambda v: model(v).mean((2, 3)), optimizer), optimizer, backend=backend,
                       warmup_steps=1)
    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 1, 0])
    sums = [step(x, y, y, i).clone() for i in (1, 2, 3)]
    assert step.static[0].is_contiguous(memory_format=torch.channels_last) and torch.equal(step.static[0], x)
    assert backend.replays == 1 and step.calls == 3  # eager, captured (runs once here), replayed
    assert all(s[0] > 0 for s in sums) and sums[2][0] < sums[0][0]  # the replayed step still learns
    with pytest.raises(ValueError, match=r'--cuda-graph: batch x of shape \(3, 3, 5, 5\).*one batch shape'):
        step(x[:3], y[:3], y[:3], 4)
    with pytest.raises(ValueError, match='fused=True'):
        GraphedStep(lambda *a: None, torch.optim.SGD(model.parameters(), lr=0.1), backend=backend)
    with pytest.raises(TypeError, match='ema must be a CapturableEma'):
        GraphedStep(lambda *a: None, optimizer, ema=torch.nn.Linear(1, 1), backend=backend)


def test_a_host_sync_in_the_step_fails_the_capture():
    """The stand-in refuses what a CUDA capture refuses: the trainer's step passes it (tests above)."""
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    plain = _linear_step(model, optimizer)

    def syncing(x, target, y, global_step):
        sums = plain(x, target, y, global_step)
        if sums[0].item() > 1e9:  # a Python branch on a device value
            raise AssertionError
        return sums

    step = GraphedStep(syncing, optimizer, backend=RecordedGraph(), warmup_steps=1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    step(x, y, y, 1)
    with pytest.raises(HostSyncInCapture, match='_local_scalar_dense'):
        step(x, y, y, 2)


@pytest.mark.parametrize('name,kwargs', [('paper_cnn', {'drop_rate': 0.5}),
                                         ('cifar_preresnet20', {'drop_block_rate': 0.1})])
def test_the_tables_baselines_capture_without_host_syncs(name, kwargs):
    """Table 1's dropout CNN and Table 2's DropBlock ResNet (timm's DropBlock2d) are capturable as they are."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
    step = GraphedStep(_linear_step(model, optimizer), optimizer, backend=RecordedGraph(), warmup_steps=1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    for global_step in (1, 2, 3):
        step(x, y, y, global_step)
    after = [p.detach().clone() for p in model.parameters()]
    step(x, y, y, 4)  # a replay
    assert step.backend.replays == 2
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    assert any(not torch.equal(a, p) for a, p in zip(after, model.parameters()))


def test_capturable_ema_follows_timms_decay_schedule():
    from timm.utils import ModelEmaV3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ours, timms = CapturableEma(model, decay=0.9, use_warmup=True), ModelEmaV3(model, decay=0.9, use_warmup=True)
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3))  # BatchNorm statistics and the integer batch count
        ours.update(model, step=step)
        timms.update(model, step=step)
        assert ours.weight.item() == pytest.approx(1 - timms.get_decay(step))
        for (k, a), b in zip(ours.module.state_dict().items(), timms.module.state_dict().values()):
            assert torch.allclose(a.double(), b.double(), rtol=0, atol=1e-6) and a.dtype == b.dtype, k


# ---------------------------------------------------------------------------------------------- refusals
def test_cuda_graph_is_refused_on_cpu_before_anything_is_written(tiny_data, tmp_path):
    with pytest.raises(ValueError, match=r'--cuda-graph: CUDA graphs need a CUDA device, and this run is on cpu '
                                         r'\(--device cpu\); drop --cuda-graph'):
        fit(quick_config(tiny_data, tmp_path / 'out', cuda_graph=True, device='cpu'))
    assert not (tmp_path / 'out').exists()


def test_refusals_name_the_option(tiny_data, tmp_path):
    cfg = quick_config(tiny_data, tmp_path, cuda_graph=True)
    model = timm.create_model('test_efficientnet', num_classes=3)
    with pytest.raises(ValueError, match="--cuda-graph: not with 2 processes"):
        check_graph_config(cfg, CUDA, 2, model)
    with pytest.raises(ValueError, match="--opt: got 'lamb', --cuda-graph supports sgd, momentum, nesterov, adam"):
        check_graph_config(dataclasses.replace(cfg, opt='lamb'), CUDA, 1, model)
    with pytest.raises(ValueError, match="--opt: got 'lookahead_momentum'"):
        check_graph_config(dataclasses.replace(cfg, opt='lookahead_momentum'), CUDA, 1, model)
    for opt, kwargs in (('momentum', {'fused': True}), ('adamw', {'capturable': True})):
        check_graph_config(dataclasses.replace(cfg, opt=opt), CUDA, 1, model)
        assert graphs.optimizer_kwargs(dataclasses.replace(cfg, opt=opt)) == kwargs
    assert graphs.optimizer_kwargs(dataclasses.replace(cfg, cuda_graph=False)) == {}
    for option, value, message in (('grad_accum_steps', 2, '--grad-accum-steps: got 2, which --cuda-graph'),
                                   ('amp_dtype', 'float16', "--amp-dtype: got 'float16', which --cuda-graph .*"
                                                            "bfloat16"),
                                   ('skip_corrupt', True, '--skip-corrupt: got True, which --cuda-graph')):
        with pytest.raises(ValueError, match=message):
            validate(dataclasses.replace(cfg, **{'amp': True, 'amp_dtype': 'bfloat16', option: value}))
    validate(dataclasses.replace(cfg, amp=True, amp_dtype='bfloat16'))


def test_fmd_sites_are_captured_only_where_the_op_declares_them_safe(tiny_data, tmp_path, monkeypatch):
    """The refusal follows the op's own declaration (timm_fmd.ops.capture), not a fixed list: with Triton the
    fused path declares CUDA for sites with lam 0 and steps 1."""
    cfg = quick_config(tiny_data, tmp_path, cuda_graph=True, model='fmd_test_efficientnet')
    fmd = timm.create_model('fmd_test_efficientnet', num_classes=3)
    plain = timm.create_model('test_efficientnet', num_classes=3)
    monkeypatch.setattr(capture, '_DECLARED', {})  # an installation without a capture-safe path
    assert not capture.capture_safe('cuda') and capture.capture_safe('cuda', plain)  # no FMD sites: nothing to ask
    with pytest.raises(ValueError, match=r'--cuda-graph: fmd_test_efficientnet cannot be captured: no capture-safe '
                                         r'path of the FMD op is available on cuda here .*drop --cuda-graph'):
        check_graph_config(cfg, CUDA, 1, fmd)
    check_graph_config(dataclasses.replace(cfg, model='test_efficientnet'), CUDA, 1, plain)
    capture.declare_capture_safe('cuda', covers=lambda op: op.lam == 0, requires='lam 0')
    assert capture.capture_safe(CUDA, fmd) and not capture.capture_safe('cpu', fmd)
    check_graph_config(cfg, CUDA, 1, fmd)
    with_lam = timm.create_model('fmd_test_efficientnet', num_classes=3, fmd_lam=0.1)
    assert capture.capture_blocker(CUDA, with_lam).startswith('6 FMD site(s) outside the capture-safe path, which '
                                                             'needs lam 0: blocks.')
    with pytest.raises(TypeError, match='device type name'):
        capture.declare_capture_safe(None)


def test_the_fused_path_declares_cuda_when_triton_imports():
    from timm_fmd.ops import fused
    assert capture.capture_safe('cuda') == fused._HAVE_TRITON
    assert not capture.capture_safe('cpu')


# ------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize('model', ['test_efficientnet', 'fmd_test_efficientnet'])
def test_cuda_graph_follows_the_eager_run_on_cuda(tiny_data, tmp_path, model):
    """A real capture: the same run eagerly and graphed on the GPU (bf16 autocast, channels_last, data on the
    device). GPU kernels are not bit-reproducible, hence the tolerances; FMD only where the op is capture-safe."""
    if model.startswith('fmd_') and not capture.capture_safe(CUDA):
        pytest.skip('the FMD op is not capture-safe on CUDA in this installation')
    common = dict(RECIPE, model=model, device='cuda', amp=True, amp_dtype='bfloat16', channels_last=True,
                  data_on_device=True, opt_kwargs={})
    runs = {}
    for graph in (False, True):
        runs[graph] = fit(quick_config(tiny_data, tmp_path / str(graph), cuda_graph=graph, **common))
    eager, graphed = _rows(tmp_path / 'False' / 'run'), _rows(tmp_path / 'True' / 'run')
    assert [r['lr'] for r in graphed] == [r['lr'] for r in eager]
    if model.startswith('fmd_'):  # the ramp advanced under replay as it does eagerly
        assert [r['fmd_prob'] for r in graphed] == pytest.approx([r['fmd_prob'] for r in eager])
    for e, g in zip(eager, graphed):
        assert g['train_loss'] == pytest.approx(e['train_loss'], rel=0.05)
