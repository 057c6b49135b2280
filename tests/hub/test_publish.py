"""Publishing runs: the repo folder, the round trip through the (local) Hub into plain timm, and failures."""
import json
import tempfile
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from safetensors.torch import load_file

from timm_fmd.hub import PublishError, load_fmd_settings, publish, push_to_hub, read_run, save_pretrained
from timm_fmd.hub.publish import REPO_FILES

from .conftest import ARCH, FMD, LABELS
from .hub_server import ORGS, TOKEN

REPO = f'{ORGS[0]}/tiny-fmd'
FMD_KWARGS = {f'fmd_{k}': tuple(v) if isinstance(v, list) else v for k, v in FMD.items()}


def _weights(run_dir: Path, name: str = 'best') -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / 'checkpoints' / f'{name}.safetensors'))


def _assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state_dict = model.state_dict()
    assert state_dict.keys() == expected.keys()
    assert all(torch.equal(state_dict[k], expected[k]) for k in expected)


def _listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob('*'))


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """Route tempfile (where push_to_hub builds the folder) to a directory the test can inspect."""
    path = tmp_path / 'tmp'
    path.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(path))
    return path


def test_dry_run_folder_loads_in_plain_timm(make_run, tmp_path):
    run_dir = make_run()
    out = Path(publish(run_dir, out_dir=tmp_path / 'out'))
    assert sorted(p.name for p in out.iterdir()) == sorted(REPO_FILES)
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == ARCH and config['num_classes'] == len(LABELS)
    assert config['label_names'] == LABELS and config['model_args']['num_classes'] == len(LABELS)
    assert config['fmd'] == {'model': f'fmd_{ARCH}', 'settings': FMD, 'global_steps': 60}
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32] and config['pretrained_cfg']['std'] == [0.25] * 3
    # a run that names no local path is published as it is
    assert (out / 'train_config.yaml').read_text() == (run_dir / 'config.yaml').read_text()
    assert json.loads((out / 'results.json').read_text()) == json.loads((run_dir / 'results.json').read_text())
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    _assert_same_weights(model, _weights(run_dir))
    assert model.pretrained_cfg['label_names'] == LABELS and model.pretrained_cfg['mean'] == [0.5] * 3
    assert load_fmd_settings(out) == FMD_KWARGS == load_fmd_settings(f'local-dir:{out}')
    assert "timm.create_model('local-dir:" in (out / 'README.md').read_text()


def test_out_dir_is_replaced_only_when_asked_or_rendered_in_place(make_run, tmp_path):
    """Nothing a user made is lost without overwrite: foreign files, an earlier publish (of this or another run).
    The source itself, a published folder, is rendered again in place; a run being published is never replaced."""
    run_dir, other = make_run(), make_run('other', seed=1)
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError) as error:
        save_pretrained(run_dir, foreign)
    assert str(error.value) == (f"out_dir {str(foreign)!r} is not empty (it holds files); pass --overwrite (Python: "
                                f"overwrite=True) to replace it, or choose another --out-dir")
    assert _listing(foreign) == ['notes.txt']
    save_pretrained(run_dir, foreign, overwrite=True)
    assert sorted(p.name for p in foreign.iterdir()) == sorted(REPO_FILES)
    before = {p.name: p.read_bytes() for p in foreign.iterdir()}
    with pytest.raises(FileExistsError, match=r'is not empty \(it holds an earlier publish\); pass --overwrite'):
        save_pretrained(other, foreign)  # another run's publish is not replaced unasked
    assert {p.name: p.read_bytes() for p in foreign.iterdir()} == before
    save_pretrained(foreign, foreign)  # the source itself: rendered again in place
    assert {p.name: p.read_bytes() for p in foreign.iterdir()} == before
    save_pretrained(other / 'checkpoints' / 'last.safetensors', foreign, overwrite=True)  # asked
    _assert_same_weights(timm.create_model(f'local-dir:{foreign}', pretrained=True), _weights(other, 'last'))
    for out_dir in (run_dir, run_dir.parent):  # the run itself, or the folder holding it: refused even when asked
        with pytest.raises(FileExistsError) as error:
            save_pretrained(run_dir, out_dir, overwrite=True)
        assert str(error.value) == (f'out_dir {str(out_dir)!r} is or holds the run {str(run_dir)!r} that is being '
                                    f'published; choose another --out-dir (Python: out_dir=)')
    assert (run_dir / 'checkpoints' / 'best.safetensors').is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['foreign', 'runs']  # no staging or backup left


def test_failed_save_leaves_nothing(make_run, tmp_path):
    run_dir = make_run()
    results = json.loads((run_dir / 'results.json').read_text())
    (run_dir / 'results.json').write_text(json.dumps({**results, 'num_classes': 7}))
    with pytest.raises(ValueError, match='does not fit'):
        save_pretrained(run_dir, tmp_path / 'out')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['runs']


def test_round_trip_through_the_hub(hub, make_run):
    run_dir = make_run()
    results = json.loads((run_dir / 'results.json').read_text())
    commit = push_to_hub(run_dir, REPO, dataset='uoft-cs/cifar10')
    assert commit.commit_url == f'{hub.url}/{REPO}/commit/{commit.oid}'
    assert hub.calls(f'/api/models/{REPO}/commit/main', 'POST') == 1  # one commit
    assert sorted(huggingface_hub.list_repo_files(REPO)) == sorted(['.gitattributes', *REPO_FILES])
    # plain timm rebuilds the trained model, in eval mode it computes what the checkpoint computes
    model = timm.create_model(f'hf-hub:{REPO}', pretrained=True).eval()
    _assert_same_weights(model, _weights(run_dir))
    assert model.pretrained_cfg['label_names'] == LABELS
    # the route a fmd_<arch> twin takes: timm's own config loader, then pretrained_cfg with hf_hub_id
    pretrained_cfg, architecture, model_args = timm.models.load_model_config_from_hf(REPO)
    twin_route = timm.create_model(architecture, pretrained=True, pretrained_cfg=pretrained_cfg, **model_args)
    _assert_same_weights(twin_route, _weights(run_dir))
    card = ModelCard.load(REPO)
    assert {r.metric_config: r.metric_value for r in card.data.eval_results} == {
        'top1': results['best']['val_top1'], 'top5': results['best']['val_top5']}
    assert load_fmd_settings(f'hf-hub:{REPO}') == FMD_KWARGS == load_fmd_settings(REPO)


def test_second_publish_is_a_second_commit_and_the_first_still_loads(hub, make_run):
    first_run, second_run = make_run('first'), make_run('second', seed=3, fmd={**FMD, 'prob': 0.2})
    first = push_to_hub(first_run, REPO, commit_message='first run')
    second = push_to_hub(second_run, REPO)
    assert first.oid != second.oid
    assert [c.title for c in huggingface_hub.list_repo_commits(REPO)][:2] == [
        f'{ARCH} trained with FMD (timm-fmd 0.1.0)', 'first run']
    _assert_same_weights(timm.create_model(f'hf-hub:{REPO}', pretrained=True), _weights(second_run))
    _assert_same_weights(timm.create_model(f'hf-hub:{REPO}@{first.oid}', pretrained=True), _weights(first_run))
    pretrained_cfg, architecture, model_args = timm.models.load_model_config_from_hf(f'{REPO}@{first.oid}')
    assert pretrained_cfg['hf_hub_id'] == f'{REPO}@{first.oid}'  # the weights are fetched at that revision too
    twin_route = timm.create_model(architecture, pretrained=True, pretrained_cfg=pretrained_cfg, **model_args)
    _assert_same_weights(twin_route, _weights(first_run))
    assert load_fmd_settings(REPO)['fmd_prob'] == 0.2
    assert load_fmd_settings(REPO, revision=first.oid)['fmd_prob'] == 0.1
    assert load_fmd_settings(f'hf-hub:{REPO}@{first.oid}')['fmd_prob'] == 0.1
    with pytest.raises(ValueError, match='contradicts'):
        load_fmd_settings(f'hf-hub:{REPO}@{first.oid}', revision='main')


def test_push_to_a_branch_of_a_private_repo(hub, make_run, monkeypatch):
    run_dir = make_run(fmd=None)
    commit = push_to_hub(run_dir, REPO, private=True, revision='v1')
    refs = {b.name: b.target_commit for b in huggingface_hub.list_repo_refs(REPO).branches}
    assert refs['v1'] == commit.oid and refs['main'] != commit.oid
    assert huggingface_hub.model_info(REPO).private
    _assert_same_weights(timm.create_model(f'hf-hub:{REPO}@v1', pretrained=True), _weights(run_dir))
    assert load_fmd_settings(REPO, revision='v1') == {}
    readme = Path(huggingface_hub.hf_hub_download(REPO, 'README.md', revision='v1')).read_text()
    assert f"timm.create_model('hf-hub:{REPO}@v1', pretrained=True)" in readme
    monkeypatch.delenv('HF_TOKEN')
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.model_info(REPO, revision='v1')


def test_server_error_on_commit(hub, make_run, private_tmp):
    run_dir = make_run()
    before = _listing(run_dir)
    hub.fail_next('commit', 500)
    with pytest.raises(PublishError, match=r'HTTP 500: server error') as e:
        push_to_hub(run_dir, REPO)
    assert isinstance(e.value.__cause__, HfHubHTTPError) and REPO in str(e.value)
    assert [c.title for c in huggingface_hub.list_repo_commits(REPO)] == ['initial commit']
    assert _listing(private_tmp) == [] and _listing(run_dir) == before


def test_missing_token(hub, make_run, monkeypatch, private_tmp):
    monkeypatch.delenv('HF_TOKEN')
    with pytest.raises(PublishError, match=r'no Hugging Face token .*: set HF_TOKEN or run `hf auth login`'):
        push_to_hub(make_run(), REPO)
    assert hub.log == [] and _listing(private_tmp) == []
    monkeypatch.setenv('HF_TOKEN', TOKEN)  # the advice
    assert push_to_hub(make_run('again'), REPO).oid


def test_overwrite_advice_from_the_command_line(make_run, tmp_path, capsys):
    from timm_fmd import cli
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'folder' / 'notes.txt').write_text('mine')
    args = ['publish', str(make_run()), '--out-dir', str(tmp_path / 'folder')]
    assert cli.main(args) == 1
    assert capsys.readouterr().err == (f"timm-fmd publish: error: out_dir {str(tmp_path / 'folder')!r} is not empty "
                                       f"(it holds files); pass --overwrite (Python: overwrite=True) to replace it, "
                                       f"or choose another --out-dir\n")
    assert cli.main(args + ['--overwrite']) == 0  # the advice


@pytest.mark.parametrize('token, repo_id, message', [
    ('hf_wrong', REPO, 'HTTP 401: the token was rejected'),
    (None, 'someone-else/tiny', 'HTTP 403: the token may not write'),
])
def test_refused_by_the_hub(hub, make_run, private_tmp, token, repo_id, message):
    with pytest.raises(PublishError, match=message):
        push_to_hub(make_run(), repo_id, token=token)
    assert _listing(private_tmp) == []


def test_hub_unreachable(hub, make_run, private_tmp):
    hub.stop()
    with pytest.raises(PublishError, match='ConnectError') as e:
        push_to_hub(make_run(), REPO)
    assert hub.url in str(e.value) and _listing(private_tmp) == []


@pytest.mark.parametrize('repo_id', ['tiny', 'a/b/c', '/tiny', 'org/', 'org/bad name', 'org/a--b', 7])
def test_wrong_repo_id(hub, make_run, repo_id):
    with pytest.raises(ValueError, match='repo_id'):
        push_to_hub(make_run(), repo_id)
    assert hub.log == []


def test_publish_needs_a_repo_id_or_an_out_dir(make_run):
    with pytest.raises(ValueError, match='repo_id'):
        publish(make_run())


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory) -> Path:
    """A real (tiny) training run: FMD ResNet-20 on 96 embedded digits, one epoch."""
    from timm_fmd.train import TrainConfig, fit
    out = tmp_path_factory.mktemp('trained')
    mp = pytest.MonkeyPatch()
    mp.setenv('TIMM_FMD_CACHE', str(out / 'cache'))
    try:
        fit(TrainConfig(epochs=1, train_subset=96, batch_size=32, workers=0, output=str(out), experiment='run',
                        fmd_ramp_epochs=1.0))
    finally:
        mp.undo()
    return out / 'run'


def test_trained_run_round_trip_restores_fmd(hub, trained_run, tmp_path):
    """Train, publish, load back: plain timm gets the weights, timm_fmd.create_model also the FMD settings
    and the ramp where training left it; the same from the dry-run folder through local-dir:."""
    import timm_fmd
    results = json.loads((trained_run / 'results.json').read_text())
    repo = f'{ORGS[0]}/digits-fmd'
    first = push_to_hub(trained_run, repo)
    plain = timm.create_model(f'hf-hub:{repo}', pretrained=True)
    _assert_same_weights(plain, _weights(trained_run))
    assert timm_fmd.fmd_ops(plain) == []  # plain timm: inference only, no FMD
    # the run's classes, not those of cifar_resnet20's default tag (CIFAR-10, also 10 classes)
    assert plain.pretrained_cfg['label_names'] == results['label_names'] == [str(d) for d in range(10)]
    for name in (f'hf-hub:{repo}', f'hf-hub:{repo}@{first.oid}',
                 f'local-dir:{save_pretrained(trained_run, tmp_path / "folder")}'):
        model = timm_fmd.create_model(name, pretrained=True)
        _assert_same_weights(model, _weights(trained_run))
        settings = timm_fmd.fmd_settings(model)
        assert (settings.prob, settings.block_size, list(settings.stages), settings.gamma) == \
            (results['fmd']['prob'], results['fmd']['block_size'], results['fmd']['stages'], results['fmd']['gamma'])
        assert timm_fmd.schedule_step(model) == results['global_steps']
        assert timm_fmd.current_prob(model) == pytest.approx(results['fmd']['prob'])  # the ramp had finished
    overridden = timm_fmd.create_model(f'hf-hub:{repo}', pretrained=True, fmd_prob=0.05)
    assert timm_fmd.fmd_settings(overridden).prob == 0.05


def test_a_published_folder_is_published_again_unchanged(make_run, tmp_path):
    """read_run takes a folder save_pretrained wrote (e.g. to render it with a newer card): in place, same files."""
    folder = save_pretrained(make_run(), tmp_path / 'tiny', repo_id=REPO, dataset='uoft-cs/cifar10')
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    again = read_run(folder)
    assert again.weights == 'best.safetensors' and again.checkpoint == folder / 'model.safetensors'
    save_pretrained(folder, folder, repo_id=REPO, dataset='uoft-cs/cifar10')
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_fmd_on_a_hub_model_as_the_advice_says(hub, make_run, tmp_path, monkeypatch, capsys):
    """--fmd-* with --model hf-hub:... is refused with a command; that command trains from the Hub weights."""
    from timm_fmd import cli
    from .conftest import make_image_folder
    push_to_hub(make_run(), REPO)
    monkeypatch.setenv('TIMM_FMD_CACHE', str(tmp_path / 'cache'))
    data = make_image_folder(tmp_path / 'data', {'train': 8, 'val': 2})
    common = ['train', '--data-dir', str(data), '--img-size', '16', '-b', '8', '--epochs', '1', '-j', '0', '--output',
              str(tmp_path / 'out'), '--fmd-prob', '0.2', '--fmd-stages', '-1']
    assert cli.main(common + ['--model', f'hf-hub:{REPO}']) == 2
    assert f'(use --model fmd_<its architecture> --pretrained hf-hub:{REPO})' in capsys.readouterr().err
    assert cli.main(common + ['--model', f'fmd_{ARCH}', '--pretrained', f'hf-hub:{REPO}', '--experiment', 'ok']) == 0
    results = json.loads((tmp_path / 'out' / 'ok' / 'results.json').read_text())
    assert results['pretrained'] == f'hf-hub:{REPO}' and results['fmd']['prob'] == 0.2
