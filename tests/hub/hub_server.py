"""A local Hugging Face Hub for tests, speaking the protocol of the real ``huggingface_hub`` client.

Standard library only: two ``ThreadingHTTPServer``s on 127.0.0.1 with OS-chosen ports.

* the Hub (``HubServer.url``, what ``HF_ENDPOINT`` points at): whoami, YAML validation, repo create/delete,
  branches, preupload, the git-LFS batch + verify API, NDJSON commits, model info (optionally at a revision),
  tree, commit and ref listings, ``resolve`` (HEAD/GET) with the Hub's headers, and dataset info for the public
  data sets in ``DATASETS`` (404 for any other id, as the Hub answers for a data set that does not exist);
* a "CDN" on its own port, i.e. another origin, the way the Hub's LFS storage is: the LFS basic-transfer PUT
  target and the redirect target of LFS downloads. URLs are signed (HMAC query) rather than authenticated,
  so the client must (and does) drop its Authorization header there.

Repos are stored in a directory, git-like: content-addressed objects (git blob sha1 for regular files, sha256
for LFS files), each commit an immutable JSON snapshot named by a 40-hex sha, branches as refs. A new repo
gets an initial commit with the Hub's default ``.gitattributes``, so ``*.safetensors`` goes through LFS as on
the Hub. Auth: one valid token (``TOKEN``) for user ``USER``, member of ``ORGS``; writes need it, private repos
answer 401 without it, a wrong token gets 401 everywhere. ``fail_next(route, status)`` makes the next call of
a route fail, e.g. ``fail_next('commit', 500)``.
"""
from __future__ import annotations

import base64
import datetime
import fnmatch
import hashlib
import hmac
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

TOKEN = 'hf_local_test_token'
USER = 'tester'
ORGS = ('fmd-org', 'timm-fmd')  # timm-fmd: the default organisation of the project's published tags
DATASETS = ('uoft-cs/cifar10',)  # public data sets of the real Hub that this one knows (dataset info only)

# The LFS rules of the .gitattributes the Hub puts in every new model repo (abridged to the weight formats).
DEFAULT_GITATTRIBUTES = ''.join(
    f'{pattern} filter=lfs diff=lfs merge=lfs -text\n'
    for pattern in ('*.bin', '*.ckpt', '*.h5', '*.npz', '*.onnx', '*.pt', '*.pth', '*.safetensors', '*.tar', '*.zip')
)
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub sends files above 10 MB through LFS whatever .gitattributes says
_REPO = r'(?P<repo>[\w.-]+/[\w.-]+)'
_ROUTES = [  # (methods, path regex, route name == handler suffix)
    ('GET', r'/api/whoami-v2', 'whoami'),
    ('POST', r'/api/validate-yaml', 'validate_yaml'),
    ('POST', r'/api/repos/create', 'create_repo'),
    ('DELETE', r'/api/repos/delete', 'delete_repo'),
    ('GET', rf'/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?', 'model_info'),
    ('GET', rf'/api/datasets/{_REPO}(?:/revision/(?P<rev>[^/]+))?', 'dataset_info'),
    ('GET', rf'/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?', 'tree'),
    ('GET', rf'/api/models/{_REPO}/commits/(?P<rev>[^/]+)', 'commits'),
    ('GET', rf'/api/models/{_REPO}/refs', 'refs'),
    ('POST', rf'/api/models/{_REPO}/branch/(?P<rev>[^/]+)', 'create_branch'),
    ('POST', rf'/api/models/{_REPO}/preupload/(?P<rev>[^/]+)', 'preupload'),
    ('POST', rf'/api/models/{_REPO}/commit/(?P<rev>[^/]+)', 'commit'),
    ('POST', rf'/{_REPO}\.git/info/lfs/objects/batch', 'lfs_batch'),
    ('POST', rf'/{_REPO}\.git/info/lfs/objects/verify', 'lfs_verify'),
    ('HEAD GET', rf'/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)', 'resolve_file'),
    ('HEAD GET', rf'/api/resolve-cache/models/{_REPO}/(?P<rev>[0-9a-f]{{40}})/(?P<path>.+)', 'resolve_file'),
]
_CDN_ROUTES = [
    ('PUT', r'/upload/(?P<oid>[0-9a-f]{64})', 'cdn_upload'),
    ('HEAD GET', r'/blobs/(?P<oid>[0-9a-f]{64})', 'cdn_blob'),
]


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, which the Hub (and the client's change detection) uses for regular files."""
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f'version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n'.encode()


def _lfs_tracked(path: str, gitattributes: str) -> bool:
    """git's rule: a pattern without '/' matches the file name at any depth, one with '/' the whole path."""
    for line in gitattributes.splitlines():
        pattern, *attrs = line.split() or ['']
        if 'filter=lfs' in attrs:
            target = path if '/' in pattern else path.rsplit('/', 1)[-1]
            if fnmatch.fnmatchcase(target, pattern.lstrip('/')):
                return True
    return False


def _front_matter(text: str):
    """The YAML metadata block at the top of a README ({} when there is none)."""
    match = re.match(r'^---\n(.*?)\n---\n', text, re.S)
    return yaml.safe_load(match[1]) if match else {}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='microseconds').replace('+00:00', 'Z')


class HttpError(Exception):
    """An error answer: status, message (also in X-Error-Message), the Hub's X-Error-Code, extra headers."""
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubServer:
    """The local Hub: ``start()``, point ``HF_ENDPOINT`` at ``url``, ``stop()``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / 'objects').mkdir(parents=True, exist_ok=True)
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request, both servers
        self.unhandled: list[str] = []  # requests no route matched or that crashed a handler: gaps of this server
        self._failures: dict[str, int] = {}
        self._lock = threading.RLock()
        self._secret = hashlib.sha256(str(self.root).encode()).digest()
        self._servers: list[ThreadingHTTPServer] = []

    # ----- life cycle and test controls -----
    def start(self) -> 'HubServer':
        for routes in (_ROUTES, _CDN_ROUTES):
            server = ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
            server.daemon_threads = True
            server.hub, server.routes = self, [(m.split(), re.compile(p), n) for m, p, n in routes]
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
            self._servers.append(server)
        self.url, self.cdn_url = (f'http://127.0.0.1:{s.server_address[1]}' for s in self._servers)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    def fail_next(self, route: str, status: int = 500) -> None:
        """Make the next request to ``route`` (a name in the route tables, e.g. 'commit') answer ``status``."""
        if route not in {n for _, _, n in _ROUTES + _CDN_ROUTES}:
            raise ValueError(f'route must be one of the server routes, got {route!r}')
        self._failures[route] = status

    def calls(self, route_path: str, method: str | None = None) -> int:
        """How many logged requests had a path containing ``route_path`` (and the given method)."""
        return sum(route_path in p and method in (None, m) for m, p, _ in self.log)

    # ----- storage -----
    def repo_dir(self, repo_id: str) -> Path:
        return self.root / 'repos' / repo_id

    def meta(self, repo_id: str) -> dict | None:
        path = self.repo_dir(repo_id) / 'repo.json'
        return json.loads(path.read_text()) if path.is_file() else None

    def save_meta(self, repo_id: str, meta: dict) -> None:
        (self.repo_dir(repo_id) / 'repo.json').write_text(json.dumps(meta))

    def commit_record(self, repo_id: str, sha: str) -> dict:
        return json.loads((self.repo_dir(repo_id) / 'commits' / f'{sha}.json').read_text())

    def object_path(self, oid: str) -> Path:
        return self.root / 'objects' / oid

    def write_commit(self, repo_id: str, branch: str, parent: str | None, files: dict, title: str,
                      message: str = '') -> str:
        record = {'parent': parent, 'files': files, 'title': title, 'message': message, 'date': _now(),
                  'author': USER}
        sha = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
        commits = self.repo_dir(repo_id) / 'commits'
        commits.mkdir(parents=True, exist_ok=True)
        (commits / f'{sha}.json').write_text(json.dumps(record))
        meta = self.meta(repo_id)
        meta['refs'][branch] = sha
        self.save_meta(repo_id, meta)
        return sha

    def store_regular(self, data: bytes) -> dict:
        oid = git_blob_oid(data)
        self.object_path(oid).write_bytes(data)
        return {'oid': oid, 'size': len(data), 'lfs': None}

    def resolve_rev(self, repo_id: str, rev: str) -> str:
        meta = self.meta(repo_id)
        if rev in meta['refs']:
            return meta['refs'][rev]
        if re.fullmatch(r'[0-9a-f]{40}', rev) and (self.repo_dir(repo_id) / 'commits' / f'{rev}.json').is_file():
            return rev
        raise HttpError(404, f'Invalid rev id: {rev}', 'RevisionNotFound')

    def sign(self, oid: str) -> str:
        return hmac.new(self._secret, oid.encode(), 'sha256').hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server_version = 'LocalHub/1.0'

    def log_message(self, format, *args):  # the request log lives in HubServer.log
        pass

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # ----- plumbing -----
    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.route_path, self.query = split.path, parse_qs(split.query)
        try:
            self.body = self._read_body()
            for methods, pattern, name in self.server.routes:
                match = pattern.fullmatch(split.path)
                if match and self.command in methods:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    with self.hub._lock:
                        if name in self.hub._failures:
                            raise HttpError(self.hub._failures.pop(name), f'injected failure of {name}')
                        getattr(self, f'_{name}')(**args)
                    break
            else:
                self.hub.unhandled.append(f'{self.command} {self.path}: no route')
                raise HttpError(404, f'no route for {self.command} {split.path}')
        except HttpError as e:
            headers = {**e.headers, 'X-Error-Message': e.message}
            if e.code:
                headers['X-Error-Code'] = e.code
            self._send(e.status, {'error': e.message}, headers)
        except Exception as e:  # a bug of this server: answer, and let the fixture report it
            self.hub.unhandled.append(f'{self.command} {self.path}: {e!r}')
            self._send(500, {'error': repr(e)})

    def _read_body(self) -> bytes:
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
            chunks = []
            while size := int(self.rfile.readline().split(b';')[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b''.join(chunks)
        return self.rfile.read(int(self.headers.get('Content-Length') or 0))

    def _json(self):
        try:
            return json.loads(self.body or b'null')
        except json.JSONDecodeError as e:
            raise HttpError(400, f'invalid JSON body: {e}')

    def _send(self, status: int, body=b'', headers: dict | None = None, content_type='application/json') -> int:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.hub.log.append((self.command, self.route_path, status))  # before the client can see the answer
        self.send_response(status)
        for key, value in {'Content-Type': content_type, 'Content-Length': str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)
        return status

    def _send_bytes(self, data: bytes, headers: dict) -> int:
        """Serve file content, honouring a single 'bytes=a-b' / 'bytes=a-' Range as the Hub and S3 do."""
        headers = {'Accept-Ranges': 'bytes', **headers}
        match = re.fullmatch(r'bytes=(\d+)-(\d*)', self.headers.get('Range', ''))
        if not match:
            return self._send(200, data, headers, 'application/octet-stream')
        start, end = int(match[1]), int(match[2] or len(data) - 1)
        if start >= len(data):
            raise HttpError(416, 'range not satisfiable', headers={'Content-Range': f'bytes */{len(data)}'})
        end = min(end, len(data) - 1)
        headers['Content-Range'] = f'bytes {start}-{end}/{len(data)}'
        return self._send(206, data[start:end + 1], headers, 'application/octet-stream')

    # ----- auth -----
    def _user(self) -> str | None:
        header = self.headers.get('Authorization')
        if header is None:
            return None
        if header != f'Bearer {TOKEN}':
            raise HttpError(401, 'Invalid credentials in Authorization header')
        return USER

    def _readable(self, repo_id: str) -> dict:
        user, meta = self._user(), self.hub.meta(repo_id)
        if meta is None or (meta['private'] and user is None):  # the Hub hides private repos from strangers
            raise HttpError(404 if meta is None else 401, 'Repository not found', 'RepoNotFound')
        return meta

    def _writable(self, repo_id: str) -> dict:
        meta = self._readable(repo_id)
        self._check_namespace(repo_id.split('/')[0])
        return meta

    def _check_namespace(self, namespace: str) -> None:
        if self._user() is None:
            raise HttpError(401, 'Authorization header is required for this operation')
        if namespace not in (USER, *ORGS):
            raise HttpError(403, f'You do not have write access to namespace {namespace}')

    # ----- account and repos -----
    def _whoami(self):
        if self._user() is None:
            raise HttpError(401, 'Invalid credentials in Authorization header')
        orgs = [{'type': 'org', 'name': org} for org in ORGS]
        token = {'type': 'access_token', 'accessToken': {'displayName': 'test', 'role': 'write'}}
        return self._send(200, {'type': 'user', 'name': USER, 'fullname': 'Test User', 'orgs': orgs, 'auth': token})

    def _validate_yaml(self):
        content = (self._json() or {}).get('content', '')
        errors = []
        try:
            if not isinstance(_front_matter(content), dict):
                errors.append('metadata must be a YAML mapping')
        except yaml.YAMLError as e:
            errors.append(f'invalid YAML: {e}')
        body = {'errors': [{'message': m} for m in errors], 'warnings': []}
        return self._send(400 if errors else 200, body)

    def _create_repo(self):
        payload = self._json()
        if payload.get('type', 'model') != 'model':
            raise HttpError(400, 'this local Hub only hosts model repos')
        namespace = payload.get('organization') or USER
        self._check_namespace(namespace)
        repo_id = f"{namespace}/{payload['name']}"
        url = f'{self.hub.url}/{repo_id}'
        if self.hub.meta(repo_id) is not None:
            return self._send(409, {'error': 'You already created this model repo', 'url': url})
        self.hub.repo_dir(repo_id).mkdir(parents=True)
        private = payload.get('visibility', 'private' if payload.get('private') else 'public') == 'private'
        self.hub.save_meta(repo_id, {'private': private, 'refs': {}, 'created_at': _now()})
        files = {'.gitattributes': self.hub.store_regular(DEFAULT_GITATTRIBUTES.encode())}
        self.hub.write_commit(repo_id, 'main', None, files, 'initial commit')
        return self._send(200, {'url': url, 'name': repo_id, 'id': hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _delete_repo(self):
        payload = self._json()
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        self._writable(repo_id)
        shutil.rmtree(self.hub.repo_dir(repo_id))  # objects stay, as in a content-addressed store
        return self._send(200, {})

    def _create_branch(self, repo, rev):
        meta = self._writable(repo)
        if rev in meta['refs']:
            raise HttpError(409, f'Reference refs/heads/{rev} already exists')
        meta['refs'][rev] = self.hub.resolve_rev(repo, (self._json() or {}).get('startingPoint', 'main'))
        self.hub.save_meta(repo, meta)
        return self._send(200, {})

    # ----- reading -----
    def _entry(self, path: str, info: dict) -> dict:
        entry = {'type': 'file', 'oid': info['oid'], 'size': info['size'], 'path': path}
        if info['lfs']:
            entry['lfs'] = info['lfs']
        return entry

    def _model_info(self, repo, rev='main'):
        meta = self._readable(repo)
        sha = self.hub.resolve_rev(repo, rev)
        commit = self.hub.commit_record(repo, sha)
        siblings = [{'rfilename': path} for path in sorted(commit['files'])]
        readme = commit['files'].get('README.md')
        card = (_front_matter(self.hub.object_path(readme['oid']).read_text()) if readme else None) or {}
        return self._send(200, {
            'id': repo, 'modelId': repo, 'author': repo.split('/')[0], 'sha': sha, 'private': meta['private'],
            'gated': False, 'disabled': False, 'lastModified': commit['date'], 'createdAt': meta['created_at'],
            'library_name': card.get('library_name'), 'tags': card.get('tags', []),
            'pipeline_tag': card.get('pipeline_tag'), 'cardData': card or None, 'siblings': siblings,
            'downloads': 0, 'likes': 0})

    def _dataset_info(self, repo, rev='main'):
        if repo not in DATASETS:
            raise HttpError(404, 'Repository not found', 'RepoNotFound')
        return self._send(200, {'id': repo, 'author': repo.split('/')[0], 'sha': '0' * 40, 'private': False,
                                'gated': False, 'disabled': False, 'downloads': 0, 'likes': 0, 'tags': [],
                                'cardData': None, 'siblings': []})

    def _tree(self, repo, rev, path=''):
        self._readable(repo)
        files = self.hub.commit_record(repo, self.hub.resolve_rev(repo, rev))['files']
        prefix = f'{path.strip("/")}/' if path.strip('/') else ''
        recursive = self.query.get('recursive', ['False'])[0].lower() in ('true', '1')
        entries, folders = [], set()
        for file_path, info in sorted(files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix):].split('/')
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + '/'.join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(self._entry(file_path, info))
        if prefix and not entries and not folders:
            raise HttpError(404, f'{path} does not exist', 'EntryNotFound')
        entries += [{'type': 'directory', 'path': f, 'size': 0, 'oid': hashlib.sha1(f.encode()).hexdigest()}
                    for f in sorted(folders)]
        return self._send(200, entries)

    def _commits(self, repo, rev):
        self._readable(repo)
        sha, items = self.hub.resolve_rev(repo, rev), []
        while sha:
            commit = self.hub.commit_record(repo, sha)
            items.append({'id': sha, 'title': commit['title'], 'message': commit['message'], 'date': commit['date'],
                          'authors': [{'user': commit['author']}]})
            sha = commit['parent']
        return self._send(200, items)

    def _refs(self, repo):
        meta = self._readable(repo)
        branches = [{'name': n, 'ref': f'refs/heads/{n}', 'targetCommit': s} for n, s in sorted(meta['refs'].items())]
        return self._send(200, {'branches': branches, 'converts': [], 'tags': [], 'pullRequests': []})

    def _resolve_file(self, repo, rev, path):
        """HEAD/GET /{repo}/resolve/{rev}/{path}. A branch answers 307 to the immutable resolve-cache URL of its
        head commit (a same-origin redirect the client follows); a regular file is served with its git oid as
        ETag; an LFS file answers 302 to the signed CDN URL, with the metadata in X-Linked-Etag/-Size."""
        self._readable(repo)
        sha = self.hub.resolve_rev(repo, rev)
        headers = {'X-Repo-Commit': sha}
        info = self.hub.commit_record(repo, sha)['files'].get(path)
        if info is None:
            raise HttpError(404, f'Entry not found: {path}', 'EntryNotFound', headers)
        if rev != sha:
            location = f'/api/resolve-cache/models/{repo}/{sha}/{quote(path)}'
            return self._send(307, b'', {**headers, 'Location': location, 'ETag': f'"{info["oid"]}"'})
        if info['lfs']:
            oid = info['lfs']['oid']
            return self._send(302, b'', {**headers, 'ETag': f'"{info["oid"]}"', 'X-Linked-Etag': f'"{oid}"',
                                         'X-Linked-Size': str(info['size']),
                                         'Location': f'{self.hub.cdn_url}/blobs/{oid}?sig={self.hub.sign(oid)}'})
        return self._send_bytes(self.hub.object_path(info['oid']).read_bytes(), {**headers, 'ETag': f'"{info["oid"]}"'})

    # ----- writing -----
    def _branch_head(self, repo: str, rev: str) -> str:
        if 'create_pr' in self.query:
            raise HttpError(400, 'this local Hub does not support pull requests')
        meta = self.hub.meta(repo)
        if rev not in meta['refs']:
            raise HttpError(404, f'Invalid rev id: {rev} (commits go to a branch)', 'RevisionNotFound')
        return meta['refs'][rev]

    def _preupload(self, repo, rev):
        self._writable(repo)
        head = self.hub.commit_record(repo, self._branch_head(repo, rev))['files']
        attributes = head.get('.gitattributes')
        gitattributes = self.hub.object_path(attributes['oid']).read_text() if attributes else ''
        out = []
        for item in self._json()['files']:
            sample = base64.b64decode(item['sample'])
            lfs = _lfs_tracked(item['path'], gitattributes) or item['size'] > LFS_THRESHOLD or b'\0' in sample
            current = head.get(item['path'])
            oid = None if current is None else (current['lfs']['oid'] if current['lfs'] else current['oid'])
            out.append({'path': item['path'], 'uploadMode': 'lfs' if lfs else 'regular', 'shouldIgnore': False,
                        'oid': oid})
        return self._send(200, {'files': out, 'commitOid': self.hub.meta(repo)['refs'][rev]})

    def _lfs_batch(self, repo):
        self._writable(repo)
        payload = self._json()
        if payload.get('operation') != 'upload' or 'basic' not in payload.get('transfers', ['basic']):
            raise HttpError(422, 'only the upload operation with the basic transfer is supported')
        objects = []
        for obj in payload['objects']:
            stored = self.hub.object_path(obj['oid'])
            item = {'oid': obj['oid'], 'size': obj['size'], 'authenticated': True}
            if not (stored.is_file() and stored.stat().st_size == obj['size']):
                item['actions'] = {
                    'upload': {'href': f"{self.hub.cdn_url}/upload/{obj['oid']}?sig={self.hub.sign(obj['oid'])}"},
                    'verify': {'href': f'{self.hub.url}/{repo}.git/info/lfs/objects/verify'},
                }
            objects.append(item)
        return self._send(200, {'transfer': 'basic', 'objects': objects}, content_type='application/vnd.git-lfs+json')

    def _lfs_verify(self, repo):
        self._writable(repo)
        payload = self._json()
        stored = self.hub.object_path(payload['oid'])
        if not (stored.is_file() and stored.stat().st_size == payload['size']):
            raise HttpError(404, f"LFS object {payload['oid']} not found")
        return self._send(200, {'success': True})

    def _commit(self, repo, rev):
        self._writable(repo)
        head = self._branch_head(repo, rev)
        files = dict(self.hub.commit_record(repo, head)['files'])
        header = None
        for line in filter(None, self.body.decode().splitlines()):
            op = json.loads(line)
            key, value = op['key'], op['value']
            if key == 'header':
                header = value
            elif key == 'file':
                if value.get('encoding') != 'base64':
                    raise HttpError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value['path']] = self.hub.store_regular(base64.b64decode(value['content']))
            elif key == 'lfsFile':
                stored = self.hub.object_path(value['oid'])
                if not stored.is_file():
                    raise HttpError(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                pointer = _lfs_pointer(value['oid'], stored.stat().st_size)
                files[value['path']] = {'oid': git_blob_oid(pointer), 'size': stored.stat().st_size,
                                        'lfs': {'oid': value['oid'], 'size': stored.stat().st_size,
                                                'pointerSize': len(pointer)}}
            else:  # deletions and copies: no flow of timm-fmd commits them
                raise HttpError(400, f'commit operation {key!r} is not supported by this local Hub')
        if header is None or not header.get('summary'):
            raise HttpError(400, 'commit header with a summary is required')
        if header.get('parentCommit') not in (None, head):
            raise HttpError(412, 'A commit has happened since. Please refresh and try again.')
        sha = self.hub.write_commit(repo, rev, head, files, header['summary'], header.get('description', ''))
        return self._send(200, {'success': True, 'commitOid': sha, 'commitUrl': f'{self.hub.url}/{repo}/commit/{sha}',
                                'hookOutput': ''})

    # ----- CDN (own origin, signed URLs, no Authorization) -----
    def _check_signature(self, oid: str) -> None:
        if 'Authorization' in self.headers:  # as S3: a signed URL and a token are two auth mechanisms
            raise HttpError(400, 'Only one auth mechanism allowed; the URL is signed')
        if not hmac.compare_digest(self.query.get('sig', [''])[0], self.hub.sign(oid)):
            raise HttpError(403, 'bad signature')

    def _cdn_upload(self, oid):
        self._check_signature(oid)
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HttpError(400, 'content does not match its sha256 oid')
        self.hub.object_path(oid).write_bytes(self.body)
        return self._send(200, b'')

    def _cdn_blob(self, oid):
        self._check_signature(oid)
        return self._send_bytes(self.hub.object_path(oid).read_bytes(), {'ETag': f'"{oid}"'})

