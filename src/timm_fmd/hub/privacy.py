"""Publishing without leaking the machine: public copies of a run's files, and the check before upload.

A run directory records where it lived: ``config.yaml`` holds ``data_dir``, ``output``,
``experiment`` and perhaps a local ``pretrained`` file; ``results.json`` the data path
(``data.name``) and the pretrained source. Published as they are, they name the user's home, user
name, client folders and host. So the published files are rewritten:

* the data set is named by the Hub dataset id given with ``--dataset``, ``digits`` for the
  embedded data set, else :data:`LOCAL_DATA` (``data_dir`` in ``train_config.yaml`` says so);
* ``output``, ``experiment`` and ``resume`` (where the run lived, not how it trained) are dropped;
* a local ``pretrained`` file becomes :data:`LOCAL_WEIGHTS`; any other string that is an
  absolute or home-relative path becomes :data:`REMOVED_PATH`.

:func:`find_leaks` then reads every file of the folder about to be published (a safetensors file's
header, all of any other file) for :func:`private_strings`: the run's absolute paths
(the run directory, every path it recorded and that path's folder), the home directory, and, as
whole words, the user name and the host name. Anything found stops the publication.
"""
from __future__ import annotations

import copy
import getpass
import re
import socket
import struct
from pathlib import Path, PurePath
from typing import Any, Iterable, Iterator, List, NamedTuple, Optional, Sequence

import yaml

__all__ = ['LOCAL_DATA', 'LOCAL_WEIGHTS', 'REMOVED_PATH', 'Private', 'dataset_label', 'public_config',
           'public_results', 'private_strings', 'find_leaks']

LOCAL_DATA = 'a local image folder'
LOCAL_WEIGHTS = 'a local weights file'
REMOVED_PATH = '<local path removed>'
_RUN_LOCATION = ('output', 'experiment', 'resume')
_WINDOWS_PATH = re.compile(r'^[A-Za-z]:[\\/]')
_WEIGHT_FILES = ('.safetensors', '.pth', '.pt', '.bin', '.ckpt', '.npz', '.h5', '.tar')


class Private(NamedTuple):
    """A string that must not be published: what it is, the text, and whether it counts only as a word."""
    kind: str
    text: str
    word: bool = False


def _is_local_path(value: str) -> bool:
    return value.startswith(('/', '~', '\\\\')) or bool(_WINDOWS_PATH.match(value))


def _scrub(value: Any) -> Any:
    """``value`` with every string that is a local path replaced by :data:`REMOVED_PATH`."""
    if isinstance(value, str):
        return REMOVED_PATH if _is_local_path(value) else value
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def _public_source(pretrained: Any) -> Any:
    """A pretrained source as published: timm tags (``arch.tag``) and ``hf-hub:`` ids stay, a file becomes
    LOCAL_WEIGHTS."""
    if not isinstance(pretrained, str) or pretrained.startswith('hf-hub:'):
        return pretrained
    is_file = '/' in pretrained or '\\' in pretrained or PurePath(pretrained).suffix.lower() in _WEIGHT_FILES
    return LOCAL_WEIGHTS if is_file else pretrained


def dataset_label(config: dict, dataset: Optional[str]) -> str:
    """How the published files name the run's data: ``dataset`` (a Hub dataset id), ``digits`` for the
    embedded data set (``data_dir`` none), else :data:`LOCAL_DATA`."""
    if dataset:
        return dataset
    return 'digits' if config.get('data_dir') is None else LOCAL_DATA


def public_config(config_text: str, dataset: Optional[str]) -> str:
    """The run's ``config.yaml`` as published in ``train_config.yaml`` (see the module docstring)."""
    config = yaml.safe_load(config_text) or {}
    header = ''
    if config.get('data_dir') is not None:
        config['data_dir'] = dataset_label(config, dataset)
        header = ('# The training recipe of this model (timm-fmd train -c train_config.yaml). Local paths are not '
                  'published:\n# data_dir names the data set; pass --data-dir with your copy of it.\n')
    for key in _RUN_LOCATION:
        config.pop(key, None)
    if 'pretrained' in config:
        config['pretrained'] = _public_source(config['pretrained'])
    return header + yaml.safe_dump(_scrub(config), sort_keys=False)


def public_results(results: dict, config_text: str, dataset: Optional[str]) -> dict:
    """The run's ``results.json`` as published (see the module docstring)."""
    public = copy.deepcopy(results)
    public['data']['name'] = dataset_label(yaml.safe_load(config_text) or {}, dataset)
    public['pretrained'] = _public_source(public.get('pretrained'))
    return _scrub(public)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def private_strings(run_dirs: Sequence[Path], records: Iterable[Any]) -> List[Private]:
    """What must not leave the machine: ``run_dirs`` (absolute), every absolute path among the strings of
    ``records`` (parsed config.yaml / results.json) and its folder, the home directory, and as whole words the
    user name and the host name."""
    found: List[Private] = []

    def path(kind: str, value: Any, min_parts: int) -> None:
        text = str(value)
        if len(PurePath(text).parts) >= min_parts:  # not '/' or a bare top-level folder such as '/data'
            found.append(Private(kind, text))

    for run_dir in run_dirs:
        path('the run directory', Path(run_dir).resolve(), 2)
    for record in records:
        for text in _strings(record):
            if _is_local_path(text):
                path('a path it recorded', Path(text).expanduser(), 3)
                path('a folder it recorded', Path(text).expanduser().parent, 3)
    path('the home directory', Path.home(), 2)
    for kind, name in (('the user name', getpass.getuser()), ('the host name', socket.gethostname())):
        for part in {name, name.split('.')[0]}:
            if len(part) >= 3:
                found.append(Private(kind, part, word=True))
    return list({(p.kind, p.text): p for p in found}.values())


def _published_bytes(path: Path) -> bytes:
    """The parts of a file a reader of the repository sees as text: a safetensors file's header, else it all."""
    if path.suffix == '.safetensors':
        with open(path, 'rb') as f:
            (size,) = struct.unpack('<Q', f.read(8))
            return f.read(size)
    return path.read_bytes()


def find_leaks(folder: Path, private: Sequence[Private], allow: Sequence[str] = ()) -> List[str]:
    """``'<file> holds <kind> <text>'`` for every private string found in a file of ``folder``, outside the
    strings of ``allow`` (published on purpose: the repo id, the dataset id, strings the user allowed)."""
    leaks = []
    for file in sorted(p for p in Path(folder).rglob('*') if p.is_file()):
        data = _published_bytes(file)
        for text in sorted(allow, key=len, reverse=True):
            data = data.replace(text.encode(), b' ' * len(text.encode()))
        for item in private:
            needle = re.escape(item.text.encode())
            pattern = rb'(?<![\w.-])' + needle + rb'(?![\w])' if item.word else needle
            if re.search(pattern, data):
                leaks.append(f'{file.relative_to(folder)} holds {item.kind} {item.text!r}')
    return leaks
