"""The project's published checkpoints: each pretrained tag has its repository folder in model_cards/,
resolves through the Hub client, and reproduces the accuracy its card states."""
import json
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file

from timm_fmd.hub.privacy import _is_local_path, find_leaks, private_strings
from timm_fmd.hub.publish import REPO_FILES
from timm_fmd.models.cifar_resnet import HUB_ORG, PUBLISHED

CARDS = Path(__file__).resolve().parents[2] / 'model_cards'


DATASETS = {'cifar_resnet20.bfmd_cifar10': 'uoft-cs/cifar10', 'cifar_resnet20.bfmd_digits': None}  # Hub ids


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_card_folder_holds_the_measured_numbers(name):
    folder = CARDS / name
    assert sorted(p.name for p in folder.iterdir()) == sorted(REPO_FILES)
    results = json.loads((folder / 'results.json').read_text())
    config = json.loads((folder / 'config.json').read_text())
    arch, tag = name.split('.')
    assert config['architecture'] == arch == results['architecture'] and config['fmd'] is not None
    assert tuple(config['label_names']) == PUBLISHED[name]['label_names']
    assert config['pretrained_cfg']['label_names'] == config['label_names']  # what model.pretrained_cfg gives
    card = ModelCard.load(folder / 'README.md')
    best = results['best']['val_top1']  # best.safetensors is what is published
    assert f'| Top-1 accuracy (%) | {best:.2f} |' in card.text
    if DATASETS[name] is None:  # no Hub data set: no datasets metadata, no model-index
        assert card.data.datasets is None and card.data.eval_results is None
    else:
        assert card.data.datasets == [DATASETS[name]]
        metrics = {m.metric_type + ':' + (m.metric_config or ''): m.metric_value for m in card.data.eval_results}
        assert metrics['accuracy:top1'] == round(best, 2)
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.hf_hub_id == f'{HUB_ORG}/{name}' and cfg.num_classes == config['num_classes']


def _absolute_paths(value):
    if isinstance(value, str):
        return [value] if _is_local_path(value) else []
    if isinstance(value, dict):
        value = list(value.values())
    return [p for v in value for p in _absolute_paths(v)] if isinstance(value, list) else []


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_card_folder_names_no_local_path(name):
    """No setting or result is a local path, the card text names none, and nothing names this machine."""
    folder = CARDS / name
    parsers = {'config.json': json.loads, 'results.json': json.loads, 'train_config.yaml': yaml.safe_load}
    for file, parse in parsers.items():
        assert _absolute_paths(parse((folder / file).read_text())) == [], file
    text = (folder / 'README.md').read_text()
    assert re.findall(r'(?<![\w:/.~-])(?:/[\w.-]+){2,}', text) == []  # URLs and repo ids are not matched
    assert find_leaks(folder, private_strings([folder], []), allow=[f'{HUB_ORG}/{name}']) == []


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_tag_downloads_through_the_hub(hub, name):
    folder = CARDS / name
    api = HfApi()
    api.create_repo(f'{HUB_ORG}/{name}', exist_ok=True)
    api.upload_folder(repo_id=f'{HUB_ORG}/{name}', folder_path=folder, commit_message='publish')
    model = timm.create_model(name, pretrained=True)
    expected = load_file(folder / 'model.safetensors')
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    fmd = timm.create_model('fmd_' + name, pretrained=True)  # the FMD twin carries the same tag
    assert all(torch.equal(v, expected[k]) for k, v in fmd.state_dict().items())


CIFAR10 = Path(__file__).resolve().parents[2].parent / 'shared' / 'data' / 'cifar10-jpg'
DATA = {'cifar_resnet20.bfmd_digits': None, 'cifar_resnet20.bfmd_cifar10': CIFAR10 / 'train.tar'}


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_checkpoint_reproduces_its_card(name, monkeypatch, tmp_path):
    """Evaluated on its validation split, the published weights give exactly the card's top-1."""
    from timm_fmd.train import config_from_dict, load_yaml, merge
    from timm_fmd.train.data import build_splits, loaders_for_model
    from timm_fmd.train.distributed import cleanup, setup
    from timm_fmd.train.evaluate import autocast, evaluate
    data = DATA[name]
    if data is not None and not data.exists():
        pytest.skip(f'{data} is absent (it exists only beside the development checkout)')
    monkeypatch.setenv('TIMM_FMD_CACHE', str(tmp_path))
    folder = CARDS / name
    overrides = dict(workers=0, device='cpu', data_dir=None if data is None else str(data))
    cfg = merge(config_from_dict(load_yaml(folder / 'train_config.yaml')), overrides)
    model = timm.create_model('cifar_resnet20', num_classes=10)
    model.load_state_dict(load_file(folder / 'model.safetensors'))
    env = setup('cpu')
    try:
        loaders = loaders_for_model(cfg, build_splits(cfg), model)
        metrics = evaluate(model, loaders.val, env, autocast(cfg, env.device))
    finally:
        cleanup(env)
    results = json.loads((folder / 'results.json').read_text())
    assert metrics['val_top1'] == pytest.approx(results['best']['val_top1'], abs=1e-9)
