"""Model cards: front matter, measured numbers taken from the run's own files, model statistics."""
import json
import re

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from torch import nn

from timm_fmd.hub import model_card, model_stats, read_run
from timm_fmd.hub.publish import build_model

from .conftest import FMD


def _card(run_source, **kwargs) -> ModelCard:
    run = read_run(run_source)
    card = model_card(run, build_model(run), 'hf-hub:fmd-org/tiny', **kwargs)
    return ModelCard(str(card))  # parse the text as the Hub and ModelCard.load would


def _row(card: ModelCard, label: str) -> list[str]:
    line = next(line for line in card.text.splitlines() if line.startswith(f'| {label} |'))
    return [cell.strip() for cell in line.strip('|').split('|')][1:]


class _TinyNet(nn.Module):
    """conv 3->8 (3x3, 8x8 input) + linear 8->3: 13824 + 24 MACs, 512 + 3 activations."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 3)

    def forward_features(self, x):
        return self.conv(x)

    def forward_head(self, x):
        return self.fc(x.mean((2, 3)))


def test_model_stats_counts_params_macs_and_activations():
    model = _TinyNet().train()
    stats = model_stats(model, (3, 8, 8))
    assert stats['params_m'] == pytest.approx((8 * 3 * 9 + 8 + 8 * 3 + 3) / 1e6)
    assert stats['gmacs'] == pytest.approx((8 * 8 * 8 * 3 * 9 + 8 * 3) / 1e9)
    assert stats['activations_m'] == pytest.approx((8 * 8 * 8 + 3) / 1e6)
    assert stats['features_shape'] == (1, 8, 8, 8)
    assert model.training  # the mode is restored


def test_model_stats_measures_a_model_on_its_own_device():
    """The probe image is made on the model's device: on 'meta' (a stand-in for a GPU on this CPU machine) the
    statistics equal the CPU ones instead of failing on a CPU tensor mixed in."""
    model = _TinyNet()
    assert model_stats(model.to('meta'), (3, 8, 8)) == model_stats(_TinyNet(), (3, 8, 8))


def test_front_matter_and_numbers_come_from_results(make_run):
    run_dir = make_run()
    results = json.loads((run_dir / 'results.json').read_text())
    card = _card(run_dir, license='mit', dataset='uoft-cs/cifar10')
    data = card.data
    assert data.library_name == 'timm' and data.license == 'mit' and data.pipeline_tag == 'image-classification'
    assert data.tags == ['image-classification', 'timm', 'feature-map-distortion']
    assert data.datasets == ['uoft-cs/cifar10'] and data.metrics == ['accuracy']
    by_config = {r.metric_config: r for r in data.eval_results}
    assert by_config['top1'].metric_value == results['best']['val_top1']
    assert by_config['top5'].metric_value == results['best']['val_top5']
    assert {r.dataset_split for r in data.eval_results} == {'carved'}
    assert {r.dataset_type for r in data.eval_results} == {'uoft-cs/cifar10'}
    assert '- **Dataset:** [uoft-cs/cifar10](https://huggingface.co/datasets/uoft-cs/cifar10)' in card.text
    assert "- **Classes (3, in output order):** `cat`, `dog`, `frog`" in card.text
    assert '![Top-1 accuracy and loss per epoch, training dashed, validation solid](curves.png)' in card.text
    assert '- **Training time:** 0.1 min (4 s) wall clock, 901 images/s while training' in card.text
    assert '- **Training hardware:** not recorded' in card.text  # make_run predates the hardware record
    assert _row(card, 'Top-1 accuracy (%)') == [f"{results['best']['val_top1']:.2f}"]
    assert _row(card, 'Final train-val gap (pp)') == [f"{results['train_val_gap']:.2f}"]
    assert _row(card, 'Evaluated epoch') == [str(results['best']['epoch'])]
    headings = re.findall(r'^##+ (.+)$', card.text, re.M)
    assert headings == ['Model Details', 'Intended Use and Limitations', 'Model Usage', 'Image Classification',
                        'Feature Map Extraction', 'Image Embeddings', 'Training', 'Results', 'Citation']
    for key, value in FMD.items():
        assert f'| `fmd_{key}` | {json.dumps(value)} |' in card.text
    assert (run_dir / 'config.yaml').read_text().strip() in card.text
    assert "timm.create_model('hf-hub:fmd-org/tiny', pretrained=True)" in card.text
    assert 'Params (M): 0.373' in card.text  # test_resnet
    assert '#  torch.Size([1, 32, 16, 16])' in card.text and '#  torch.Size([1, 96, 1, 1])' in card.text
    for citation in ('Beyond Dropout: Feature Map Distortion', 'Shi, Boxin', '2002.11022', '10.5281/zenodo.4414861'):
        assert citation in card.text


def test_published_checkpoint_decides_which_numbers(make_run):
    run_dir = make_run()
    results = json.loads((run_dir / 'results.json').read_text())
    card = _card(run_dir / 'checkpoints' / 'last.safetensors', dataset='uoft-cs/cifar10')
    assert {r.metric_config: r.metric_value for r in card.data.eval_results} == {
        'top1': results['final']['val_top1'], 'top5': results['final']['val_top5']}


def test_run_without_evaluation_reports_no_accuracy(make_run):
    card = _card(make_run(evaluated=False))
    assert card.data.eval_results is None and 'model-index' not in card.content
    assert 'no accuracy is reported' in card.text
    assert 'Top-1 accuracy (%) |' not in card.text


def test_baseline_is_reported_beside_the_run(make_run):
    run_dir, baseline_dir = make_run('fmd'), make_run('baseline', fmd=None, seed=5)
    base = json.loads((baseline_dir / 'results.json').read_text())
    run = json.loads((run_dir / 'results.json').read_text())
    card = _card(run_dir, baseline=read_run(baseline_dir))
    assert _row(card, 'FMD') == ['yes', 'no']
    assert _row(card, 'Top-1 accuracy (%)') == [f"{run['best']['val_top1']:.2f}", f"{base['best']['val_top1']:.2f}"]
    assert _row(card, 'Final train-val gap (pp)') == [f"{run['train_val_gap']:.2f}", f"{base['train_val_gap']:.2f}"]
    baseline_card = _card(baseline_dir)
    assert 'trained **without** Feature Map Distortion' in baseline_card.text


def test_read_run_rejects_what_is_not_a_finished_run(make_run, tmp_path):
    run_dir = make_run()
    with pytest.raises(ValueError, match='does not exist'):
        read_run(tmp_path / 'nowhere')
    with pytest.raises(ValueError, match='.safetensors checkpoint'):
        read_run(run_dir / 'results.json')
    (run_dir / 'results.json').unlink()
    with pytest.raises(ValueError, match='not a finished training run: it has no results.json$'):
        read_run(run_dir)
    (run_dir / 'checkpoints' / 'last.state.pt').write_bytes(b'')  # interrupted after a checkpoint: resumable
    with pytest.raises(ValueError, match=re.escape(f'it has no results.json; finish it first: '
                                                   f'`timm-fmd train --resume {run_dir}`')):
        read_run(run_dir)
    assert read_run(make_run('other')).checkpoint.name == 'best.safetensors'


def test_stats_in_card_are_the_models(make_run):
    run = read_run(make_run())
    model = build_model(run)
    stats = model_stats(model, (3, 32, 32))
    text = str(model_card(run, model, 'hf-hub:fmd-org/tiny'))
    assert f"GMACs: {stats['gmacs']:.3g}" in text and f"Activations (M): {stats['activations_m']:.3g}" in text
    assert sum(p.numel() for p in model.parameters()) == run.results['param_count']
    assert torch.equal(model.fc.weight, load_file(str(run.checkpoint))['fc.weight'])


def test_metadata_lists_only_a_hub_dataset_and_rounds_its_numbers(make_run):
    """Without a Hub dataset id the front matter names no data set and has no model-index (its dataset must be a
    Hub id); the numbers stay in the card. model-index values are rounded to 0.01, as the card's tables are."""
    run_dir = make_run()
    results = json.loads((run_dir / 'results.json').read_text())
    results['best']['val_top1'] = 21.666666666666668
    (run_dir / 'results.json').write_text(json.dumps(results))
    card = _card(run_dir)
    assert card.data.datasets is None and card.data.eval_results is None and 'model-index' not in card.content
    assert 'UCI handwritten digits embedded in timm-fmd' in card.text and _row(card, 'Top-1 accuracy (%)') == ['21.67']
    card = _card(run_dir, dataset='uoft-cs/cifar10')
    assert {r.metric_config: r.metric_value for r in card.data.eval_results}['top1'] == 21.67
    assert 'value: 21.67\n' in card.content and '21.666' not in card.content


def test_hardware_and_many_classes(make_run):
    run_dir = make_run()
    results = json.loads((run_dir / 'results.json').read_text())
    results.update(hardware=dict(device='cuda', name='NVIDIA H200', processes=2, threads=8), wall_time_s=5400.0)
    (run_dir / 'results.json').write_text(json.dumps(results))
    text = _card(run_dir).text
    assert '- **Training hardware:** 2 x GPU (NVIDIA H200), 8 torch CPU thread(s) per process' in text
    assert '- **Training time:** 90.0 min (5400 s) wall clock' in text
    from timm_fmd.hub.card import _classes
    many = _classes([f'c{i}' for i in range(25)])
    assert many.startswith('- **Classes (25, in output order):** <details>') and '`c24`' in many
