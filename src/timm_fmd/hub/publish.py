"""Publish a training run as a timm model repo on the Hugging Face Hub, and read its FMD settings back.

The repo folder is what timm itself writes (``timm.models.save_for_hf``): ``model.safetensors`` holding the
base architecture's state dict and a ``config.json`` naming that architecture, so plain
``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` rebuilds the trained model for inference. timm-fmd
adds an ``fmd`` section to config.json (the run's FMD settings and schedule; null for a baseline run), the
run's ``train_config.yaml``, ``results.json``, ``metrics.csv`` and ``curves.png``, and a model card.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Sequence

import yaml

import huggingface_hub
import timm
from huggingface_hub import CommitInfo, HfApi
from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id as _check_hub_repo_id
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .. import __version__
from .card import RunRecord, model_card, read_run
from .privacy import find_leaks, private_strings, public_config, public_results

__all__ = ['PublishError', 'FMD_KEYS', 'REPO_FILES', 'validate_repo_id', 'validate_dataset_id', 'build_model',
           'save_pretrained',
           'push_to_hub', 'publish', 'read_config', 'fmd_kwargs', 'load_fmd_settings']

# results.json["fmd"] keys, in the order of the ``fmd_<key>`` arguments of timm_fmd.create_model
FMD_KEYS = ('prob', 'block_size', 'stages', 'sites', 'gamma', 'lam', 'steps', 'mode', 'shared_mask', 'stage_scale',
            'ramp_steps')
_TUPLE_KEYS = ('stages', 'sites', 'stage_scale')
# everything save_pretrained may write; a folder holding only these and an fmd-bearing config.json is ours
REPO_FILES = ('model.safetensors', 'config.json', 'README.md', 'train_config.yaml', 'results.json', 'metrics.csv',
              'curves.png')
_COPIED = {'metrics.csv': 'metrics.csv', 'curves.png': 'curves.png'}  # train_config.yaml, results.json: rewritten


class PublishError(RuntimeError):
    """Publishing to the Hub failed; the message says what and why, the cause is chained."""


def _hub_id(value: str, name: str, kind: str) -> str:
    """``value`` if huggingface_hub accepts it as a repo id, else a ``ValueError`` naming ``name``."""
    try:
        _check_hub_repo_id(value)
    except HFValidationError as e:
        raise ValueError(f'{name} {value!r} is not a valid Hub {kind} id: {e}') from None
    return value


def validate_repo_id(repo_id: str) -> str:
    """Check that ``repo_id`` is a Hub model id of the form ``ORG/NAME``; return it."""
    if not isinstance(repo_id, str) or repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise ValueError(f"repo_id must have the form 'ORG/NAME', got {repo_id!r}")
    return _hub_id(repo_id, 'repo_id', 'repo')


def build_model(run: RunRecord) -> nn.Module:
    """The base timm architecture of ``run`` holding its checkpoint (loaded strictly)."""
    results = run.results
    architecture = results['architecture']
    if not timm.is_model(architecture):
        raise ValueError(f'architecture {architecture!r} of {run.run_dir} is not in timm\'s registry; import the '
                         'package that registers it first')
    with safe_open(str(run.checkpoint), 'pt') as f:
        saved_architecture = (f.metadata() or {}).get('architecture', architecture)
    if saved_architecture != architecture:
        raise ValueError(f'{run.checkpoint} holds {saved_architecture!r} weights, results.json says {architecture!r}')
    model = timm.create_model(architecture, pretrained=False,
                              **{**results['model_kwargs'], 'num_classes': results['num_classes']})
    try:
        model.load_state_dict(load_file(str(run.checkpoint)), strict=True)
    except RuntimeError as e:
        raise ValueError(f'{run.checkpoint} does not fit {architecture!r}: {e}') from None
    return model


def _fmd_section(results: dict[str, Any]) -> dict[str, Any] | None:
    fmd = results['fmd']
    if fmd is None:
        return None
    unknown = sorted(set(fmd) - set(FMD_KEYS))
    if unknown:
        raise ValueError(f'results.json fmd has unknown settings {unknown}; known: {list(FMD_KEYS)}')
    # the schedule: the ramp (settings['ramp_steps']) and how far training got along it
    return {'model': results['model'], 'settings': fmd, 'global_steps': results['global_steps']}


def validate_dataset_id(dataset: str) -> str:
    """Check that ``dataset`` has the form of a Hub dataset id (``ORG/NAME``, or a legacy ``NAME``); return it."""
    if not isinstance(dataset, str) or dataset.count('/') > 1:
        raise ValueError(f"dataset must be a Hugging Face Hub dataset id such as 'uoft-cs/cifar10', got {dataset!r}")
    return _hub_id(dataset, 'dataset', 'dataset')


def _public(run: RunRecord, dataset: str | None) -> RunRecord:
    """``run`` with the results and config as published: no local path (see :mod:`timm_fmd.hub.privacy`)."""
    return dataclasses.replace(run, results=public_results(run.results, run.config_text, dataset),
                               config_text=public_config(run.config_text, dataset))


def _write_repo_folder(run: RunRecord, folder: Path, model_id: str, license: str, baseline: RunRecord | None,
                       dataset: str | None) -> None:
    run = _public(run, dataset)
    results, data = run.results, run.results['data']
    model = build_model(run)
    data_config = {k: data[k] for k in ('input_size', 'mean', 'std', 'interpolation', 'crop_pct') if data.get(k)}
    # label_names: the run's classes (timm would keep the architecture's default cfg's when the class count matches)
    pretrained_cfg = {'tag': None, 'license': license, 'label_names': results['label_names'],
                      'description': f"{results['architecture']} trained on {data['name']} with timm-fmd"}
    if results['fmd']:
        pretrained_cfg.update(paper_ids='arXiv:2002.11022',
                              paper_name='Beyond Dropout: Feature Map Distortion to Regularize Deep Neural Networks')
    timm.models.save_for_hf(
        model, folder, safe_serialization=True, data_config=data_config,
        model_config={'label_names': results['label_names'], 'pretrained_cfg': pretrained_cfg,
                      'fmd': _fmd_section(results)})
    for source, target in _COPIED.items():
        if (run.run_dir / source).is_file():
            shutil.copyfile(run.run_dir / source, folder / target)
    (folder / 'train_config.yaml').write_text(run.config_text)
    (folder / 'results.json').write_text(json.dumps(results, indent=2) + '\n')
    model_card(run, model, model_id, license=license, baseline=baseline, dataset=dataset).save(folder / 'README.md')


def _refuse_leaks(folder: Path, runs: Sequence[RunRecord], allow: Sequence[str]) -> None:
    """Raise ValueError if a file of ``folder`` names a local path, the home directory, the user or the host
    outside the strings of ``allow``."""
    records = [record for run in runs for record in (run.results, yaml.safe_load(run.config_text))]
    leaks = find_leaks(folder, private_strings([run.run_dir for run in runs], records), allow)
    if leaks:
        strings = sorted({leak.rsplit(' ', 1)[1] for leak in leaks})
        raise ValueError(f'refusing to publish {runs[0].run_dir}: {"; ".join(leaks)}. Nothing published may name '
                         f'this machine. If a string is not private (e.g. a class name equal to your user name), '
                         f'allow it: --allow {" --allow ".join(strings)} (Python: allow=[...])')


def _is_our_output(folder: Path) -> bool:
    try:
        return ({p.name for p in folder.iterdir()} <= set(REPO_FILES)
                and 'fmd' in json.loads((folder / 'config.json').read_text()))
    except (OSError, ValueError):
        return False


def _check_out_dir(out_dir: Path, run: RunRecord, baseline: RunRecord | None, overwrite: bool) -> None:
    """Refuse an ``out_dir`` whose contents would be lost without ``overwrite``, and one that is or holds a run
    being published (even with ``overwrite``). The one folder replaced unasked is the source itself when it is a
    published folder: rendering it again in place (``timm-fmd publish FOLDER --out-dir FOLDER``) loses nothing."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f'out_dir {str(out_dir)!r} exists and is not a directory')
    target = out_dir.resolve()
    in_place = (run.run_dir.resolve() == target and run.checkpoint.resolve() == target / 'model.safetensors'
                and _is_our_output(target))  # only the files save_pretrained writes: the render replaces them
    for record in (run, baseline):
        if record is None or (record is run and in_place):
            continue
        source = record.run_dir.resolve()
        if source == target or target in source.parents:
            raise FileExistsError(f'out_dir {str(out_dir)!r} is or holds the run {str(record.run_dir)!r} that is '
                                  'being published; choose another --out-dir (Python: out_dir=)')
    if any(out_dir.iterdir()) and not overwrite and not in_place:
        held = 'an earlier publish' if _is_our_output(out_dir) else 'files'
        raise FileExistsError(f'out_dir {str(out_dir)!r} is not empty (it holds {held}); pass --overwrite (Python: '
                              'overwrite=True) to replace it, or choose another --out-dir')


def _readable_by_all(folder: Path) -> None:
    """Give the folder and its files the modes the umask allows: safetensors' writer creates 0600 files."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def save_pretrained(source: str | os.PathLike, out_dir: str | os.PathLike, *, repo_id: str | None = None,
                    revision: str | None = None, baseline: str | os.PathLike | None = None,
                    license: str = 'apache-2.0', dataset: str | None = None, overwrite: bool = False,
                    allow: Sequence[str] = ()) -> Path:
    """Write the Hub repo folder of a run to ``out_dir`` (atomically) and return its path.

    Nothing in the folder names the machine: the run's files are published without local paths (see
    :mod:`timm_fmd.hub.privacy`), and a folder in which the run's absolute paths, the home directory, the user
    name or the host name still appear is refused with a ValueError that lists them (nothing is written then).

    Args:
        source: A RUN_DIR, or a ``.safetensors`` checkpoint inside one (default: results.json's checkpoint).
        out_dir: The folder to create. An existing non-empty folder is replaced only if ``overwrite`` is set, or
            if it is ``source`` itself, a published folder rendered again in place. A folder that is or holds the
            run (or ``baseline``) is refused.
        repo_id: The Hub id (``ORG/NAME``) the card's usage snippets load; without it they load the folder.
        revision: The branch of ``repo_id`` the snippets load (``hf-hub:ORG/NAME@revision``); default main.
        baseline: A RUN_DIR whose results the card reports beside this run's.
        license: Hub license id written to the card and the pretrained config.
        dataset: The Hugging Face Hub id of the data set (e.g. ``uoft-cs/cifar10``): listed in the card's
            metadata and naming the data in the published files. Default: no data set in the metadata, the data
            named ``digits`` (the embedded set) or ``a local image folder``.
        overwrite: Replace a non-empty ``out_dir`` (an earlier publish of any run, or anything else).
        allow: Strings the leak check lets through (e.g. a class name that equals the user name).
    """
    if dataset is not None:
        validate_dataset_id(dataset)
    run = read_run(source)
    baseline_run = read_run(baseline) if baseline is not None else None
    out_dir = Path(out_dir)
    if repo_id is not None:
        model_id = f'hf-hub:{validate_repo_id(repo_id)}' + (f'@{revision}' if revision not in (None, 'main') else '')
    elif revision is not None:
        raise ValueError(f'revision={revision!r} needs a repo_id')
    else:  # the folder's name, not its path: the card must not name this machine's directories
        model_id = f'local-dir:{out_dir.resolve().name}'
    _check_out_dir(out_dir, run, baseline_run, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # build beside out_dir (same file system) so the final step is a rename: no reader sees a half-written folder
    staging = out_dir.with_name(f'.{out_dir.name}.{uuid.uuid4().hex[:8]}.tmp')
    staging.mkdir()
    try:
        _write_repo_folder(run, staging, model_id, license, baseline_run, dataset)
        published = [s for s in (repo_id, dataset) if s]  # named on purpose, even if they hold the user name
        _refuse_leaks(staging, [run] + ([baseline_run] if baseline_run else []), [*allow, *published])
        _readable_by_all(staging)
        if out_dir.exists():
            previous = out_dir.with_name(f'.{out_dir.name}.{uuid.uuid4().hex[:8]}.old')
            os.replace(out_dir, previous)
            try:
                os.replace(staging, out_dir)
            except OSError:
                os.replace(previous, out_dir)
                raise
            shutil.rmtree(previous)
        else:
            os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _failure(error: Exception, repo_id: str, endpoint: str) -> str:
    status = getattr(getattr(error, 'response', None), 'status_code', None)
    reasons = {401: 'the token was rejected, or the repo is not visible with it',
               403: 'the token may not write to this namespace or repo', 404: 'repo or revision not found'}
    head = f'publishing to {repo_id!r} on {endpoint} failed'
    if status is not None:
        reason = reasons.get(status, 'server error on the Hub' if status >= 500 else 'request refused')
        head += f' (HTTP {status}: {reason})'
    detail = str(error).strip().splitlines()
    return f'{head}: {type(error).__name__}: {detail[0] if detail else ""}'


def push_to_hub(source: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None,
                baseline: str | os.PathLike | None = None, license: str = 'apache-2.0',
                dataset: str | None = None, allow: Sequence[str] = ()) -> CommitInfo:
    """Publish a run to the Hub as ``repo_id`` in one commit; return the commit (``.oid``, ``.commit_url``).

    Creates the repo if needed (``private`` applies then) and the branch ``revision`` if given and missing. The
    token comes from ``token``, else the client's usual places (HF_TOKEN, ``hf auth login``). ``dataset`` must
    be a data set on that Hub. Raises ValueError for a bad ``repo_id``, ``dataset`` or run and for a folder that
    would leak local names (see :func:`save_pretrained`), PublishError when the Hub cannot be reached, refuses,
    or has no such data set; the folder is built in a temporary directory that is always removed.
    """
    validate_repo_id(repo_id)
    if dataset is not None:
        validate_dataset_id(dataset)
    token = token or huggingface_hub.get_token()
    if not token:
        raise PublishError(f'no Hugging Face token to publish {repo_id!r}: set HF_TOKEN or run `hf auth login` '
                           '(Python: token=)')
    api = HfApi(token=token, library_name='timm-fmd', library_version=__version__)
    with tempfile.TemporaryDirectory(prefix='timm-fmd-publish-') as tmp:
        folder = save_pretrained(source, Path(tmp) / 'repo', repo_id=repo_id, revision=revision, baseline=baseline,
                                 license=license, dataset=dataset, allow=allow)
        results = json.loads((folder / 'results.json').read_text())
        regularizer = 'with FMD' if results['fmd'] else 'without FMD'
        if dataset is not None:
            _check_dataset_exists(api, dataset)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision not in (None, 'main'):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id, folder_path=folder, revision=revision,
                commit_message=commit_message or f"{results['architecture']} trained {regularizer} "
                                                 f"(timm-fmd {__version__})")
        except Exception as e:  # any failure of the remote step: HTTP errors, connection errors, README rejected
            raise PublishError(_failure(e, repo_id, api.endpoint)) from e


def _check_dataset_exists(api: HfApi, dataset: str) -> None:
    try:
        api.dataset_info(dataset)
    except RepositoryNotFoundError as e:
        raise PublishError(f'--dataset {dataset!r}: no such data set on {api.endpoint}; give the id of its page '
                           f'(huggingface.co/datasets/<id>), or leave --dataset out') from e
    except Exception as e:
        raise PublishError(_failure(e, dataset, api.endpoint)) from e


def publish(source: str | os.PathLike, repo_id: str | None = None, *, out_dir: str | os.PathLike | None = None,
            private: bool = False, revision: str | None = None, commit_message: str | None = None,
            baseline: str | os.PathLike | None = None, license: str = 'apache-2.0', dataset: str | None = None,
            overwrite: bool = False, allow: Sequence[str] = ()) -> str:
    """The ``timm-fmd publish`` entry: with ``out_dir``, write the repo folder there (a dry run, nothing is
    uploaded) and return its path; otherwise push to ``repo_id`` and return the commit URL."""
    if out_dir is not None:
        return str(save_pretrained(source, out_dir, repo_id=repo_id, revision=revision, baseline=baseline,
                                   license=license, dataset=dataset, overwrite=overwrite, allow=allow))
    if repo_id is None:
        raise ValueError('publish needs repo_id (ORG/NAME) to push, or out_dir for a dry run')
    return push_to_hub(source, repo_id, private=private, revision=revision, commit_message=commit_message,
                       baseline=baseline, license=license, dataset=dataset, allow=allow).commit_url


def read_config(model: str | os.PathLike, revision: str | None = None) -> dict[str, Any]:
    """config.json of a published model: ``hf-hub:ORG/NAME[@revision]``, ``ORG/NAME[@revision]``,
    ``local-dir:PATH`` or a folder path. Only config.json is downloaded."""
    name = str(model)
    if name.startswith('local-dir:') or (not name.startswith('hf-hub:') and Path(name).is_dir()):
        if revision is not None:
            raise ValueError(f'revision applies to Hub ids only, got revision={revision!r} for folder {name!r}')
        return json.loads((Path(name.removeprefix('local-dir:')) / 'config.json').read_text())
    repo_id, _, at_revision = name.removeprefix('hf-hub:').partition('@')
    if at_revision and revision is not None and at_revision != revision:
        raise ValueError(f'revision={revision!r} contradicts the @{at_revision} in {name!r}')
    validate_repo_id(repo_id)
    path = huggingface_hub.hf_hub_download(repo_id, 'config.json', revision=revision or at_revision or None)
    return json.loads(Path(path).read_text())


def fmd_kwargs(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``fmd_*`` keyword arguments recorded in a config.json ({} for a baseline)."""
    if 'fmd' not in config:
        raise ValueError(f'config.json of {source!r} has no "fmd" section: it was not published by timm-fmd')
    if config['fmd'] is None:
        return {}
    settings = config['fmd']['settings']
    unknown = sorted(set(settings) - set(FMD_KEYS))
    if unknown:
        raise ValueError(f'config.json of {source!r} has unknown FMD settings {unknown}; known: {list(FMD_KEYS)}')
    return {f'fmd_{k}': tuple(v) if k in _TUPLE_KEYS and v is not None else v for k, v in settings.items()}


def load_fmd_settings(model: str | os.PathLike, revision: str | None = None) -> dict[str, Any]:
    """The FMD settings a published model was trained with, as ``fmd_*`` keyword arguments ({} for a baseline).

    Args:
        model: ``hf-hub:ORG/NAME[@revision]``, ``ORG/NAME[@revision]``, ``local-dir:PATH`` or a folder path.
            Only config.json is downloaded.
        revision: Branch, tag or commit sha on the Hub (same as ``@revision``).
    """
    return fmd_kwargs(read_config(model, revision), str(model))
