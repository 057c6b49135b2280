"""The local Hub server, exercised through the real huggingface_hub client and timm's hf-hub: loader."""
import json
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from safetensors.torch import save_file

from .hub_server import ORGS, USER

REPO = f'{ORGS[0]}/tiny'


def _folder(path: Path, version: int) -> Path:
    """A small model repo folder: weights (LFS by .gitattributes), a config and a card (regular files)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({'w': torch.full((4, 4), float(version))}, str(path / 'model.safetensors'))
    (path / 'config.json').write_text(json.dumps({'version': version}))
    (path / 'README.md').write_text(f'---\nlibrary_name: timm\ntags:\n- timm\n---\n# tiny v{version}\n')
    return path


def _upload(tmp_path: Path, version: int, **kwargs):
    return huggingface_hub.upload_folder(repo_id=REPO, folder_path=_folder(tmp_path / f'v{version}', version),
                                         commit_message=f'v{version}', **kwargs)


def test_client_points_at_local_server(hub):
    from huggingface_hub import constants
    assert constants.ENDPOINT == hub.url
    assert huggingface_hub.hf_api.api.endpoint == hub.url  # what timm's `model_info` import is bound to
    assert huggingface_hub.hf_hub_url(REPO, 'x') == f'{hub.url}/{REPO}/resolve/main/x'
    assert huggingface_hub.whoami()['name'] == USER
    assert hub.calls('/api/whoami-v2', 'GET') == 1


def test_create_repo_exist_ok(hub):
    url = huggingface_hub.create_repo(REPO)
    assert url == f'{hub.url}/{REPO}' and url.repo_id == REPO
    with pytest.raises(HfHubHTTPError) as e:
        huggingface_hub.create_repo(REPO)
    assert e.value.response.status_code == 409
    assert huggingface_hub.create_repo(REPO, exist_ok=True).repo_id == REPO
    # a new repo starts with the Hub's .gitattributes, which routes *.safetensors through LFS
    assert huggingface_hub.list_repo_files(REPO) == ['.gitattributes']
    with pytest.raises(HfHubHTTPError) as e:
        huggingface_hub.create_repo('someone-else/tiny')
    assert e.value.response.status_code == 403
    huggingface_hub.delete_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.model_info(REPO)


def test_upload_folder_is_one_commit_with_safetensors_through_lfs(hub, tmp_path):
    huggingface_hub.create_repo(REPO)
    info = _upload(tmp_path, 1)
    assert hub.calls('/commit/main', 'POST') == 1
    assert hub.calls('/info/lfs/objects/batch') == 1 and hub.calls('/upload/', 'PUT') == 1
    assert hub.calls('/info/lfs/objects/verify') == 1
    commits = huggingface_hub.list_repo_commits(REPO)
    assert [c.commit_id for c in commits][0] == info.oid and [c.title for c in commits] == ['v1', 'initial commit']
    assert huggingface_hub.model_info(REPO, revision=info.oid).sha == info.oid
    assert huggingface_hub.list_repo_files(REPO) == ['.gitattributes', 'README.md', 'config.json', 'model.safetensors']
    tree = {f.path: f for f in HfApi().list_repo_tree(REPO, recursive=True)}
    weights = (tmp_path / 'v1' / 'model.safetensors').read_bytes()
    assert tree['model.safetensors'].lfs.size == len(weights) and tree['config.json'].lfs is None
    refs = huggingface_hub.list_repo_refs(REPO)
    assert [(b.name, b.target_commit) for b in refs.branches] == [('main', info.oid)]


def test_download_a_revision_after_a_second_commit(hub, tmp_path):
    huggingface_hub.create_repo(REPO)
    first = _upload(tmp_path, 1).oid
    second = _upload(tmp_path, 2).oid
    assert first != second
    old = huggingface_hub.hf_hub_download(REPO, 'model.safetensors', revision=first)
    assert Path(old).read_bytes() == (tmp_path / 'v1' / 'model.safetensors').read_bytes()
    new = huggingface_hub.hf_hub_download(REPO, 'config.json')
    assert json.loads(Path(new).read_text()) == {'version': 2}
    snapshot = Path(huggingface_hub.snapshot_download(REPO, revision=first))
    assert snapshot.name == first
    assert sorted(p.name for p in snapshot.iterdir()) == ['.gitattributes', 'README.md', 'config.json',
                                                          'model.safetensors']
    assert json.loads((snapshot / 'config.json').read_text()) == {'version': 1}
    # the LFS download left the Hub's origin for the CDN, which got no Authorization header
    assert hub.calls('/blobs/', 'GET') >= 1
    partial = huggingface_hub.get_session().get(huggingface_hub.hf_hub_url(REPO, 'config.json', revision=first),
                                                headers={'Range': 'bytes=1-4'})
    assert partial.status_code == 206 and partial.content == b'"ver'


def test_private_repo_and_auth(hub, monkeypatch, tmp_path):
    huggingface_hub.create_repo(REPO, private=True)
    assert huggingface_hub.model_info(REPO).private is True
    monkeypatch.delenv('HF_TOKEN')
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.model_info(REPO)
    with pytest.raises(HfHubHTTPError) as e:  # a write without a token
        huggingface_hub.create_repo(f'{ORGS[0]}/other')
    assert e.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as e:
        huggingface_hub.model_info(REPO, token='hf_wrong')
    assert e.value.response.status_code == 401


def test_fail_next_commit(hub, tmp_path):
    huggingface_hub.create_repo(REPO)
    hub.fail_next('commit', 500)
    with pytest.raises(HfHubHTTPError) as e:
        _upload(tmp_path, 1)
    assert e.value.response.status_code == 500
    assert len(huggingface_hub.list_repo_commits(REPO)) == 1
    _upload(tmp_path, 1)  # the failure was for one commit only
    assert len(huggingface_hub.list_repo_commits(REPO)) == 2


def test_model_card_load_and_yaml_validation(hub, tmp_path):
    huggingface_hub.create_repo(REPO)
    _upload(tmp_path, 1)
    card = ModelCard.load(REPO)
    assert card.data.library_name == 'timm' and card.text.strip() == '# tiny v1'
    assert huggingface_hub.model_info(REPO).card_data.tags == ['timm']
    card.validate()  # through /api/validate-yaml
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'README.md').write_text('---\n- a list, not a mapping\n---\n')
    with pytest.raises(ValueError, match='mapping'):
        huggingface_hub.upload_folder(repo_id=REPO, folder_path=bad)


def test_timm_loads_hf_hub_models_and_revisions(hub, tmp_path):
    huggingface_hub.create_repo(REPO)
    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = timm.create_model('test_resnet', num_classes=3)
        timm.models.save_for_hf(model, tmp_path / f'm{seed}', safe_serialization=True)
        commit = huggingface_hub.upload_folder(repo_id=REPO, folder_path=tmp_path / f'm{seed}')
        weights.append((commit.oid, model.state_dict()))
    for model_id, (_, expected) in ((f'hf-hub:{REPO}', weights[1]), (f'hf-hub:{REPO}@{weights[0][0]}', weights[0])):
        loaded = timm.create_model(model_id, pretrained=True).state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
