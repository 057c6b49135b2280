"""Publishing names nothing of the machine: no local path, user name or host in any published file."""
import argparse
import json
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from timm_fmd import cli
from timm_fmd.hub import PublishError, push_to_hub, save_pretrained
from timm_fmd.hub.privacy import Private, find_leaks, private_strings, public_config, public_results

from .conftest import make_image_folder
from .hub_server import ORGS

REPO = f'{ORGS[0]}/private-data'


@pytest.fixture
def alice(tmp_path, monkeypatch):
    """User alice on host alice-laptop.corp.example, home under tmp_path."""
    home = tmp_path / 'home' / 'alice'
    home.mkdir(parents=True)
    for var, value in (('HOME', str(home)), ('USER', 'alice'), ('LOGNAME', 'alice')):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr('socket.gethostname', lambda: 'alice-laptop.corp.example')
    return home


@pytest.fixture
def client_run(alice, monkeypatch):
    """A real (tiny) run on /home/alice/clients/acme-xray, from a local pretrained file, written under home."""
    from timm_fmd.train import TrainConfig, fit
    data = make_image_folder(alice / 'clients' / 'acme-xray', {'train': 8, 'val': 2})
    weights = alice / 'weights' / 'start.safetensors'
    weights.parent.mkdir()
    torch.manual_seed(0)
    save_file(timm.create_model('test_efficientnet', num_classes=3).state_dict(), str(weights))
    monkeypatch.setenv('TIMM_FMD_CACHE', str(alice / '.cache'))
    fit(TrainConfig(data_dir=str(data), model='fmd_test_efficientnet', pretrained=str(weights), img_size=16,
                    batch_size=8, epochs=1, workers=0, output=str(alice / 'runs'), experiment='xray-v1',
                    checkpoint_interval=0, warmup_epochs=0, lr=0.05))
    return alice / 'runs' / 'xray-v1'


PRIVATE = ('alice', 'acme-xray', 'clients', 'corp.example', 'home/', 'xray-v1', 'start.safetensors')


def _published_text(folder: Path) -> str:
    return '\n'.join(p.read_bytes().decode('latin-1') for p in folder.iterdir() if p.suffix != '.safetensors')


def test_a_run_on_a_private_folder_publishes_no_local_name(client_run, tmp_path, capsys):
    out = tmp_path / 'out'
    assert cli.main(['publish', str(client_run), '--out-dir', str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    text = _published_text(out)
    for private in PRIVATE + (str(tmp_path),):
        assert private not in text, private
    config = yaml.safe_load((out / 'train_config.yaml').read_text())
    assert config['data_dir'] == 'a local image folder' and config['pretrained'] == 'a local weights file'
    assert not {'output', 'experiment', 'resume'} & set(config)
    assert (out / 'train_config.yaml').read_text().startswith('# The training recipe of this model')
    results = json.loads((out / 'results.json').read_text())
    assert results['data']['name'] == 'a local image folder' and results['pretrained'] == 'a local weights file'
    description = json.loads((out / 'config.json').read_text())['pretrained_cfg']['description']
    assert description == 'test_efficientnet trained on a local image folder with timm-fmd'
    card = ModelCard.load(out / 'README.md')
    assert card.data.datasets is None and card.data.eval_results is None
    assert 'trained on a local image folder with Feature Map Distortion' in card.text
    assert "timm.create_model('local-dir:out', pretrained=True)" in card.text  # the folder's name, not its path


def test_the_repo_and_dataset_ids_are_published_on_purpose(client_run, tmp_path):
    """A Hub namespace equal to the local user name is no leak: the ids are what the user chose to publish."""
    out = save_pretrained(client_run, tmp_path / 'out', repo_id='alice/xray-model', dataset='alice/xray')
    text = _published_text(out)
    assert "timm.create_model('hf-hub:alice/xray-model', pretrained=True)" in text and 'alice/xray' in text
    assert 'alice' not in text.replace('alice/xray-model', '').replace('alice/xray', '')


def test_the_dataset_option_names_the_data(client_run, tmp_path):
    out = save_pretrained(client_run, tmp_path / 'out', dataset='uoft-cs/cifar10')
    assert yaml.safe_load((out / 'train_config.yaml').read_text())['data_dir'] == 'uoft-cs/cifar10'
    assert json.loads((out / 'results.json').read_text())['data']['name'] == 'uoft-cs/cifar10'
    card = ModelCard.load(out / 'README.md')
    assert card.data.datasets == ['uoft-cs/cifar10']
    assert {r.dataset_type for r in card.data.eval_results} == {'uoft-cs/cifar10'}
    with pytest.raises(ValueError, match="dataset must be a Hugging Face Hub dataset id such as 'uoft-cs/cifar10'"):
        save_pretrained(client_run, tmp_path / 'bad', dataset='/home/alice/clients/acme-xray')


def test_the_published_recipe_runs_again_with_a_data_dir(client_run, tmp_path):
    """What train_config.yaml's header says: pass --data-dir (and a pretrained source) with your copy."""
    from timm_fmd.train.config import add_arguments, config_from_args
    out = save_pretrained(client_run, tmp_path / 'out')
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    copy = make_image_folder(tmp_path / 'copy', {'train': 8, 'val': 2})
    cfg = config_from_args(parser.parse_args(['-c', str(out / 'train_config.yaml'), '--data-dir', str(copy),
                                              '--pretrained', 'false']))
    original = yaml.safe_load((client_run / 'config.yaml').read_text())
    assert (cfg.model, cfg.lr, cfg.epochs, cfg.img_size) == (original['model'], original['lr'], original['epochs'],
                                                             original['img_size'])


def test_the_leak_check_refuses_what_slipped_through_and_allow_lets_it_pass(client_run, tmp_path):
    """A class named like the user, and a class name holding the run's path: both refused, naming file and string."""
    results = json.loads((client_run / 'results.json').read_text())
    results['label_names'] = ['alice', f'scans from {client_run}', 'stripes']
    (client_run / 'results.json').write_text(json.dumps(results))
    with pytest.raises(ValueError) as refused:
        save_pretrained(client_run, tmp_path / 'out')
    message = str(refused.value)
    assert "README.md holds the user name 'alice'" in message and "config.json holds the user name 'alice'" in message
    assert f"config.json holds the run directory '{client_run}'" in message
    assert f"--allow '{client_run}'" in message and "--allow 'alice'" in message
    assert not (tmp_path / 'out').exists()
    results['label_names'][1] = 'scans'
    (client_run / 'results.json').write_text(json.dumps(results))
    out = save_pretrained(client_run, tmp_path / 'out', allow=['alice'])  # the advice for a non-private string
    assert json.loads((out / 'config.json').read_text())['label_names'] == ['alice', 'scans', 'stripes']


def test_push_checks_the_dataset_on_the_hub(hub, client_run):
    with pytest.raises(PublishError, match=r"--dataset 'acme/xray': no such data set on http://127\.0\.0\.1:\d+; "
                                           r'give the id of its page'):
        push_to_hub(client_run, REPO, dataset='acme/xray')
    assert hub.calls(f'/api/models/{REPO}', 'POST') == 0 and hub.calls('/api/repos/create') == 0  # nothing sent
    commit = push_to_hub(client_run, REPO, dataset='uoft-cs/cifar10')
    readme = Path(huggingface_hub.hf_hub_download(REPO, 'README.md', revision=commit.oid)).read_text()
    assert 'datasets:\n- uoft-cs/cifar10' in readme and 'alice' not in readme


def test_find_leaks_reads_words_paths_and_safetensors_headers(tmp_path):
    folder = tmp_path / 'f'
    folder.mkdir()
    (folder / 'a.txt').write_text('alias of al; alice-run; /srv/x/y/z.tar')
    save_file({'w': torch.zeros(1)}, str(folder / 'model.safetensors'), metadata={'by': 'bob'})
    private = [Private('the user name', 'ali', word=True), Private('the user name', 'alice', word=True),
               Private('the host name', 'bob', word=True), Private('a path it recorded', '/srv/x/y')]
    assert find_leaks(folder, private) == ["a.txt holds the user name 'alice'", "a.txt holds a path it recorded "
                                           "'/srv/x/y'", "model.safetensors holds the host name 'bob'"]
    assert find_leaks(folder, private, allow=['alice-run', '/srv/x/y/z.tar', 'bob']) == []


def test_private_strings(alice, tmp_path):
    found = private_strings([tmp_path / 'run'], [{'data_dir': '/data', 'pretrained': '/srv/w/start.pt', 'x': 'a/b'}])
    texts = {p.text for p in found}
    assert {str(tmp_path / 'run'), '/srv/w/start.pt', '/srv/w', str(alice), 'alice', 'alice-laptop',
            'alice-laptop.corp.example'} == texts  # '/data' and '/srv' alone are too generic to refuse


@pytest.mark.parametrize('source, published', [
    ('resnet50.a1_in1k', 'resnet50.a1_in1k'), ('.a1_in1k', '.a1_in1k'), ('hf-hub:org/name', 'hf-hub:org/name'),
    (True, True), (False, False), ('weights.safetensors', 'a local weights file'),
    ('ckpt/best.pth', 'a local weights file'), ('/home/alice/w.bin', 'a local weights file')])
def test_pretrained_sources_as_published(source, published):
    config = yaml.safe_dump({'data_dir': None, 'pretrained': source})
    assert yaml.safe_load(public_config(config, None))['pretrained'] == published
    assert public_results({'data': {'name': 'digits'}, 'pretrained': source}, config, None)['pretrained'] == published
