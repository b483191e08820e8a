"""A tiny in-memory Hugging Face Hub for tests, on 127.0.0.1 only: the part of the HTTP API that `create_repo`,
`create_branch`, `upload_folder` (preupload + commit, every file sent inline as a "regular" file: no LFS/xet) and
downloads (`hf_hub_download`, `from_pretrained`: resolve, model info, tree) use.

    with LocalHub() as hub:                 # serves until the block ends, or max_seconds at most
        os.environ["HF_ENDPOINT"] = hub.url
        ...
    hub.requests                            # [(method, path, status)] for debugging

Not a Hub: no auth, no LFS, no PRs; unknown routes answer 404 and are recorded in `hub.unhandled`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class _Repo:
    def __init__(self, private: bool):
        self.private = private
        self.commits: dict[str, dict[str, bytes]] = {}  # sha -> {path: content}
        self.branches: dict[str, str | None] = {"main": None}

    def snapshot(self, revision: str) -> tuple[str | None, dict[str, bytes]] | None:
        sha = self.branches.get(revision, revision if revision in self.commits else "missing")
        if sha == "missing":
            return None
        return sha, (self.commits[sha] if sha else {})


class LocalHub:
    def __init__(self, max_seconds: float = 300):
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.unhandled: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._timer = threading.Timer(max_seconds, self.stop)  # stops by itself even if a test forgets to
        self._timer.daemon = True

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self._timer.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].snapshot(revision)[1])

    # -------------------------------------------------------------------------------------------- request handling
    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict, bytes]:
        parts = [unquote(p) for p in urlsplit(path).path.strip("/").split("/")]
        with self._lock:
            if method == "POST" and parts == ["api", "repos", "create"]:
                return self._create(json.loads(body))
            if method == "POST" and parts == ["api", "validate-yaml"]:
                return _validate_yaml(json.loads(body)["content"])
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = "/".join(parts[2:4]), parts[4:]
                repo = self.repos.get(repo_id)
                if repo is None:
                    return _error(404, "RepoNotFound", f"Repository {repo_id} not found")
                if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                    files = json.loads(body)["files"]
                    return _json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                            for f in files]})
                if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                    return self._commit(repo_id, repo, rest[1], body)
                if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                    if rest[1] in repo.branches:
                        return _error(409, None, f"Branch {rest[1]} already exists")
                    repo.branches[rest[1]] = repo.branches["main"]
                    return _json({})
                if method == "GET" and (not rest or (len(rest) == 2 and rest[0] == "revision")):
                    return self._info(repo_id, repo, rest[1] if rest else "main")
                if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                    return self._tree(repo, rest[1], "/".join(rest[2:]))
            if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        self.unhandled.append(f"{method} {path}")
        return _error(404, None, f"not served by LocalHub: {method} {path}")

    def _create(self, payload):
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return _json({"error": "You already created this model repo", "url": url}, status=409)
        self.repos[repo_id] = _Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        return _json({"url": url, "name": repo_id})

    def _commit(self, repo_id, repo, revision, body):
        snap = repo.snapshot(revision)
        if snap is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = dict(snap[1])
        summary = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["key"] == "header":
                summary = item["value"].get("summary", "")
            elif item["key"] == "file":
                value = item["value"]
                files[value["path"]] = base64.b64decode(value["content"]) if value.get("encoding") == "base64" \
                    else value["content"].encode()
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"], None)
            else:
                return _error(400, None, f"LocalHub does not support {item['key']!r} (LFS/xet) entries")
        digest = hashlib.sha1(json.dumps(sorted((p, hashlib.sha1(c).hexdigest()) for p, c in files.items())).encode()
                              + (snap[0] or "").encode() + summary.encode()).hexdigest()
        repo.commits[digest] = files
        if revision in repo.branches:
            repo.branches[revision] = digest
        return _json({"commitUrl": f"{self.url}/{repo_id}/commit/{digest}", "commitOid": digest,
                      "commitMessage": summary, "success": True})

    def _info(self, repo_id, repo, revision):
        snap = repo.snapshot(revision)
        if snap is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return _json({"id": repo_id, "modelId": repo_id, "sha": snap[0], "private": repo.private, "tags": [],
                      "siblings": [{"rfilename": p} for p in sorted(snap[1])]})

    def _tree(self, repo, revision, folder):
        snap = repo.snapshot(revision)
        if snap is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        prefix = f"{folder}/" if folder else ""
        entries, dirs = [], set()
        for path, content in sorted(snap[1].items()):
            if not path.startswith(prefix):
                continue
            head, _, tail = path[len(prefix):].partition("/")
            if tail:
                dirs.add(prefix + head)
            else:
                entries.append({"type": "file", "path": path, "size": len(content), "oid": _oid(content)})
        if folder and not entries and not dirs:
            return _error(404, "EntryNotFound", f"{folder} does not exist on {revision}")
        return _json([{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)] + entries)

    def _resolve(self, repo_id, revision, path):
        repo = self.repos.get(repo_id)
        if repo is None:
            return _error(404, "RepoNotFound", f"Repository {repo_id} not found")
        snap = repo.snapshot(revision)
        if snap is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        sha, files = snap
        if path not in files:
            return _error(404, "EntryNotFound", f"{path} does not exist on {revision}", {"X-Repo-Commit": sha or ""})
        content = files[path]
        return 200, {"ETag": f'"{_oid(content)}"', "X-Repo-Commit": sha, "Content-Type": "application/octet-stream"}, \
            content


def _validate_yaml(content: str):
    """The Hub checks README.md metadata before a commit; here: the front matter must be a YAML mapping."""
    import yaml

    errors = []
    if content.startswith("---\n"):
        front, sep, _ = content[4:].partition("\n---")
        try:
            meta = yaml.safe_load(front) if sep else None
            if not isinstance(meta, dict):
                errors.append({"message": "metadata must be a YAML mapping between --- lines"})
        except yaml.YAMLError as error:
            errors.append({"message": f"invalid YAML: {error}"})
    return _json({"errors": errors, "warnings": []}, status=400 if errors else 200)


def _oid(content: bytes) -> str:  # git blob id, as the Hub reports for regular files
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _json(payload, status=200):
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _error(status, code, message, extra=None):
    headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
    if code:
        headers["X-Error-Code"] = code
    return status, headers, json.dumps({"error": message}).encode()


def _handler(hub: LocalHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30

        def _serve(self, method):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                status, headers, payload = hub.handle(method, self.path, body)
            except Exception as error:  # a bug in the fake must show up as a 500, not hang the client
                status, headers, payload = _error(500, None, f"LocalHub error: {error!r}")
            hub.requests.append((method, self.path, status))
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)

        def do_GET(self):  # noqa: N802
            self._serve("GET")

        def do_HEAD(self):  # noqa: N802
            self._serve("HEAD")

        def do_POST(self):  # noqa: N802
            self._serve("POST")

        def log_message(self, *args):  # quiet
            pass

    return Handler
