"""A loopback HTTP server speaking the part of the Hugging Face Hub API that huggingface_hub needs to push and pull.

Test infrastructure only (never shipped): repos live in a temporary folder, one folder per commit, with branch and
tag refs in a JSON file. Enough for create_repo, upload_folder / push_to_hub, create_tag, model_info,
list_repo_tree, hf_hub_download, snapshot_download and from_pretrained(repo_id). Uploads are always "regular"
(base64 in the commit call), never LFS/Xet.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_SHA_LENGTH = 40


class HubStore:
    """Repos on disk: ``root/<owner>/<name>/refs.json`` and ``root/<owner>/<name>/commits/<sha>/<files>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()

    def repo(self, repo_id: str) -> Path:
        return self.root / repo_id

    def exists(self, repo_id: str) -> bool:
        return (self.repo(repo_id) / "refs.json").is_file()

    def refs(self, repo_id: str) -> dict[str, dict[str, str]]:
        return json.loads((self.repo(repo_id) / "refs.json").read_text())

    def create(self, repo_id: str) -> bool:
        with self.lock:
            if self.exists(repo_id):
                return False
            self.repo(repo_id).mkdir(parents=True)
            empty = self._store_commit(repo_id, {}, "initial commit", None)
            self._write_refs(repo_id, {"branches": {"main": empty}, "tags": {}})
            return True

    def resolve(self, repo_id: str, revision: str) -> str | None:
        refs = self.refs(repo_id)
        if revision in refs["branches"]:
            return refs["branches"][revision]
        if revision in refs["tags"]:
            return refs["tags"][revision]
        if len(revision) == _SHA_LENGTH and (self.repo(repo_id) / "commits" / revision).is_dir():
            return revision
        return None

    def files(self, repo_id: str, sha: str) -> dict[str, Path]:
        folder = self.repo(repo_id) / "commits" / sha
        return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}

    def commit(self, repo_id: str, branch: str, added: dict[str, bytes], deleted: list[str], message: str) -> str:
        with self.lock:
            refs = self.refs(repo_id)
            parent = refs["branches"].get(branch)
            if parent is None:
                raise KeyError(branch)
            contents = {path: file.read_bytes() for path, file in self.files(repo_id, parent).items()}
            for path in deleted:
                contents.pop(path, None)
            contents.update(added)
            sha = self._store_commit(repo_id, contents, message, parent)
            refs["branches"][branch] = sha
            self._write_refs(repo_id, refs)
            return sha

    def add_ref(self, repo_id: str, kind: str, name: str, revision: str) -> bool:
        """Create branch or tag `name` (kind "branches" / "tags") at `revision`; False if impossible."""
        with self.lock:
            sha = self.resolve(repo_id, revision)
            refs = self.refs(repo_id)
            if sha is None or name in refs[kind]:
                return False
            refs[kind][name] = sha
            self._write_refs(repo_id, refs)
            return True

    def _store_commit(self, repo_id: str, contents: dict[str, bytes], message: str, parent: str | None) -> str:
        digest = hashlib.sha1(f"{parent}\n{message}\n{time.time_ns()}".encode())
        for path in sorted(contents):
            digest.update(path.encode() + b"\0" + hashlib.sha1(contents[path]).digest())
        sha = digest.hexdigest()
        folder = self.repo(repo_id) / "commits" / sha
        staging = folder.with_name(f".{sha}.partial")
        for path, data in contents.items():
            target = staging / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        staging.mkdir(parents=True, exist_ok=True)
        staging.rename(folder)
        return sha

    def _write_refs(self, repo_id: str, refs: dict) -> None:
        temporary = self.repo(repo_id) / "refs.json.tmp"
        temporary.write_text(json.dumps(refs))
        temporary.replace(self.repo(repo_id) / "refs.json")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LoopbackHub

    def log_message(self, format, *args):  # quiet
        pass

    # ----- plumbing ----------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message}, head=head)

    def _parts(self) -> list[str]:
        return [unquote(part) for part in urlsplit(self.path).path.strip("/").split("/")]

    def _repo_revision(self, parts: list[str]) -> tuple[str, str] | None:
        """(repo_id, revision) of ``models/{owner}/{name}/<verb>/{revision}/...`` (the revision may be encoded)."""
        repo_id = "/".join(parts[1:3])
        if not self.server.store.exists(repo_id):
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        return repo_id, parts[4] if len(parts) > 4 else "main"

    # ----- verbs -------------------------------------------------------------------------------------------------

    def do_HEAD(self):
        self._resolve(head=True)

    def do_GET(self):
        parts = self._parts()
        if parts[:2] == ["api", "models"]:
            return self._api_get(parts[1:])
        return self._resolve(head=False)

    def do_POST(self):
        parts = self._parts()
        body = self._body()
        if parts == ["api", "repos", "create"]:
            return self._create(json.loads(body or b"{}"))
        if parts == ["api", "validate-yaml"]:
            return self._json(200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 5:
            verb = parts[4]
            repo_id = "/".join(parts[2:4])
            if not self.server.store.exists(repo_id):
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            revision = parts[5] if len(parts) > 5 else "main"
            if verb == "preupload":
                files = json.loads(body)["files"]
                return self._json(
                    200,
                    {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                )
            if verb == "commit":
                return self._commit(repo_id, revision, body)
            if verb == "branch":
                start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
                if not self.server.store.add_ref(repo_id, "branches", revision, start):
                    return self._error(409, "Conflict", f"cannot create branch {revision} from {start}")
                return self._json(200, {})
            if verb == "tag":
                tag = json.loads(body)["tag"]
                if not self.server.store.add_ref(repo_id, "tags", tag, revision):
                    return self._error(409, "Conflict", f"cannot create tag {tag} at {revision}")
                return self._json(200, {})
        self._error(404, "NotFound", f"no route for POST {self.path}")

    # ----- handlers ----------------------------------------------------------------------------------------------

    def _create(self, payload: dict) -> None:
        name = payload.get("name", "")
        owner = payload.get("organization") or "user"
        repo_id = f"{owner}/{name}"
        if payload.get("type", "model") not in ("model", None):
            return self._error(400, "BadRequest", "only model repos are served")
        if not self.server.store.create(repo_id):  # the Hub still sends the url (create_repo(exist_ok=True) reads it)
            message = "You already created this model repo"
            body = json.dumps({"error": message, "url": f"{self.server.url}/{repo_id}"}).encode()
            return self._send(409, body, {"X-Error-Code": "Conflict", "X-Error-Message": message})
        self._json(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        message = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                message = value.get("summary", "")
            elif item["key"] == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                return self._error(400, "BadRequest", f"unsupported commit operation {item['key']}")
        try:
            sha = self.server.store.commit(repo_id, revision, added, deleted, message)
        except KeyError:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        self._json(
            200,
            {"commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None},
        )

    def _api_get(self, parts: list[str]) -> None:
        # models/{owner}/{name}[/revision/{rev} | /tree/{rev}[/{path}] | /refs]
        store = self.server.store
        repo_id = "/".join(parts[1:3])
        if not store.exists(repo_id):
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        verb = parts[3] if len(parts) > 3 else "revision"
        revision = parts[4] if len(parts) > 4 else "main"
        if verb == "refs":
            refs = store.refs(repo_id)
            return self._json(
                200,
                {
                    "branches": [
                        {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in refs["branches"].items()
                    ],
                    "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in refs["tags"].items()],
                    "converts": [],
                },
            )
        sha = store.resolve(repo_id, revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = store.files(repo_id, sha)
        if verb == "revision":
            return self._json(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": sha,
                    "private": False,
                    "tags": [],
                    "siblings": [{"rfilename": path, "size": file.stat().st_size} for path, file in files.items()],
                },
            )
        if verb == "tree":
            prefix = "/".join(parts[5:])
            entries = []
            folders = set()
            for path, file in files.items():
                if prefix and not path.startswith(prefix + "/"):
                    continue
                entries.append(
                    {"type": "file", "path": path, "size": file.stat().st_size, "oid": _blob_oid(file.read_bytes())}
                )
                for depth in range(1, path.count("/") + 1):
                    folders.add("/".join(path.split("/")[:depth]))
            entries += [{"type": "directory", "path": folder, "oid": "0" * 40, "size": 0} for folder in sorted(folders)]
            return self._json(200, entries)
        self._error(404, "NotFound", f"no route for GET {self.path}")

    def _resolve(self, head: bool) -> None:
        # /{owner}/{name}/resolve/{rev}/{path...}
        parts = self._parts()
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, "NotFound", f"no route for {self.path}", head=head)
        store = self.server.store
        repo_id = "/".join(parts[:2])
        if not store.exists(repo_id):
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
        sha = store.resolve(repo_id, parts[3])
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {parts[3]}", head=head)
        path = "/".join(parts[4:])
        file = store.files(repo_id, sha).get(path)
        if file is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {sha}", head=head)
        data = file.read_bytes()
        data = self.server.tamper.get((repo_id, path), lambda payload: payload)(data)
        headers = {"ETag": f'"{_blob_oid(file.read_bytes())}"', "X-Repo-Commit": sha}
        self._send(200, data, {"Content-Type": "application/octet-stream", **headers}, head=head)


def _blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


class LoopbackHub(ThreadingHTTPServer):
    """``LoopbackHub(root).start()`` serves on 127.0.0.1 at a free port; ``.url`` is the endpoint."""

    daemon_threads = True

    def __init__(self, root: Path, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.store = HubStore(Path(root))
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        # {(repo_id, path): function(bytes) -> bytes}: serve altered bytes, to test corrupted downloads
        self.tamper: dict[tuple[str, str], callable] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> LoopbackHub:
        self._thread = threading.Thread(target=self.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        shutil.rmtree(self.store.root, ignore_errors=True)
