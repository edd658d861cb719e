"""A Hugging Face Hub on 127.0.0.1, for tests: the parts of the Hub's HTTP API that huggingface_hub's downloads
(`snapshot_download`, `hf_hub_download`), its file system (`HfFileSystem`, hf:// paths) and its uploads
(`create_repo`, `upload_folder`) call, over repositories held in memory. Point a process at it with
HF_ENDPOINT=http://127.0.0.1:PORT.

    hub = FakeHub.start()
    hub.add("models", "org/tiny", folder)        # a commit of every file under `folder`
    ... HF_ENDPOINT=hub.url ...
    hub.files("models", "org/tiny")              # {path: bytes} at main, e.g. after an upload

`populate_cache` writes a repository into a Hugging Face cache folder as huggingface_hub lays it out (blobs,
snapshots linking to them, refs/main), for runs with HF_HUB_OFFLINE=1 and no server at all.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


class Repo:
    def __init__(self):
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}

    def commit(self, files: dict[str, bytes], parent: str | None = None) -> str:
        tree = dict(self.commits[parent]) if parent else {}
        tree.update(files)
        sha = hashlib.sha1(repr((sorted((k, hashlib.sha256(v).hexdigest()) for k, v in tree.items()), time.time_ns()))
                           .encode()).hexdigest()
        self.commits[sha] = tree
        self.refs["main"] = sha
        return sha

    def at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        sha = self.refs.get(revision, revision)
        return (sha, self.commits[sha]) if sha in self.commits else None


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client hanging up mid-reply is not news
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class FakeHub:
    def __init__(self, server: ThreadingHTTPServer):
        self.server = server
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[str] = []  # "METHOD path" of every request, for tests that count downloads

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @classmethod
    def start(cls) -> "FakeHub":
        server = Server(("127.0.0.1", 0), Handler)
        hub = cls(server)
        server.hub = hub
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return hub

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, kind: str, repo_id: str, folder: str | Path) -> str:
        """A commit of every file under `folder` to `repo_id` (`kind`: models or datasets); returns its sha."""
        folder = Path(folder)
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        with self.lock:
            repo = self.repos.setdefault((kind, repo_id), Repo())
            return repo.commit(files, repo.refs.get("main"))

    def files(self, kind: str, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[(kind, repo_id)].at(revision)[1])


def kind_of(word: str) -> str:
    return {"model": "models", "dataset": "datasets", "space": "spaces"}.get(word, word)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    # ---- replies ----

    def reply(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def json(self, obj, status: int = 200) -> None:
        self.reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def missing(self, what: str, code: str = "RepoNotFound") -> None:
        self.reply(404, json.dumps({"error": what}).encode(), {"Content-Type": "application/json", "X-Error-Code": code})

    def body(self) -> bytes:
        return self._body

    # ---- routing ----

    def do_HEAD(self) -> None:
        self.route("HEAD")

    def do_GET(self) -> None:
        self.route("GET")

    def do_POST(self) -> None:
        self.route("POST")

    def route(self, method: str) -> None:
        # read whole before any reply: a body left unread would be taken for the next request on this connection
        self._body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlparse(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        self.hub.requests.append(f"{method} {path}")
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"]:
            return self.api(method, parts[1:], query)
        kind = "models"
        if parts[:1] in (["datasets"], ["spaces"]):
            kind, parts = parts[0], parts[1:]
        if len(parts) >= 4 and parts[2] == "resolve":
            return self.resolve(method, kind, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        self.missing(f"no route {path}", "EntryNotFound")

    def repo(self, kind: str, repo_id: str) -> Repo | None:
        return self.hub.repos.get((kind, repo_id))

    def resolve(self, method: str, kind: str, repo_id: str, revision: str, filename: str) -> None:
        repo = self.repo(kind, repo_id)
        found = repo.at(revision) if repo else None
        if found is None:
            return self.missing(f"{repo_id}@{revision} not found", "RepoNotFound" if repo is None else "RevisionNotFound")
        sha, tree = found
        if filename not in tree:
            return self.missing(f"{filename} not found", "EntryNotFound")
        data = tree[filename]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        ranged = self.headers.get("Range")
        if ranged and ranged.startswith("bytes="):
            start, _, end = ranged[len("bytes="):].partition("-")
            start, end = int(start or 0), int(end) if end else len(data) - 1
            part = data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(data)}"
            return self.reply(206, part, headers, head=method == "HEAD")
        self.reply(200, data, headers, head=method == "HEAD")

    def api(self, method: str, parts: list[str], query: dict) -> None:
        if parts == ["validate-yaml"]:  # a README.md's metadata block, checked before a commit that adds one
            return self.json({"errors": [], "warnings": []})
        if parts == ["whoami-v2"]:
            return self.json({"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}})
        if parts == ["repos", "create"] and method == "POST":
            req = json.loads(self.body() or b"{}")
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            kind = kind_of(req.get("type") or "model")
            with self.hub.lock:
                if (kind, repo_id) in self.hub.repos:
                    return self.json({"error": "You already created this repo", "url": f"{self.hub.url}/{repo_id}"},
                                     409)
                self.hub.repos[(kind, repo_id)] = Repo()
                self.hub.repos[(kind, repo_id)].commit({".gitattributes": b""})
            return self.json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id})
        if len(parts) < 3:
            return self.missing("no route")
        kind, repo_id, rest = kind_of(parts[0]), "/".join(parts[1:3]), parts[3:]
        repo = self.repo(kind, repo_id)
        if repo is None:
            return self.missing(f"{repo_id} not found")
        if not rest or rest[0] == "revision":
            found = repo.at(rest[1] if len(rest) > 1 else "main")
            if found is None:
                return self.missing("revision not found", "RevisionNotFound")
            sha, tree = found
            return self.json({"id": repo_id, "sha": sha, "private": False, "disabled": False, "gated": False,
                              "siblings": [{"rfilename": p, "size": len(d)} for p, d in sorted(tree.items())]})
        if rest[0] == "tree":
            found = repo.at(rest[1])
            if found is None:
                return self.missing("revision not found", "RevisionNotFound")
            prefix = "/".join(rest[2:])
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self.json(self.listing(found[1], prefix, recursive, found[0]))
        if rest[0] == "paths-info" and method == "POST":
            found = repo.at(rest[1])
            if found is None:
                return self.missing("revision not found", "RevisionNotFound")
            raw = self.body().decode()
            form = parse_qs(raw) if not raw.startswith("{") else {"paths": json.loads(raw).get("paths", [])}
            entries = []
            for p in form.get("paths", []):
                entries += [e for e in self.listing(found[1], p.rsplit("/", 1)[0] if "/" in p else "", False, found[0])
                            if e["path"] == p.strip("/")]
            return self.json(entries)
        if rest[0] == "preupload" and method == "POST":
            files = json.loads(self.body())["files"]
            return self.json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                        for f in files]})
        if rest[0] == "commit" and method == "POST":
            files, deleted = {}, []
            for line in self.body().decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    deleted.append(item["value"]["path"])
            with self.hub.lock:
                parent = repo.refs.get(rest[1], rest[1])
                sha = repo.commit(files, parent)
                for p in deleted:
                    repo.commits[sha] = {k: v for k, v in repo.commits[sha].items()
                                         if k != p and not k.startswith(p.rstrip("/") + "/")}
            return self.json({"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                              "commitMessage": "", "pullRequestUrl": None})
        self.missing(f"no route {'/'.join(rest)}", "EntryNotFound")

    @staticmethod
    def listing(tree: dict[str, bytes], prefix: str, recursive: bool, sha: str) -> list[dict]:
        prefix = prefix.strip("/")
        base = prefix + "/" if prefix else ""
        out, dirs = [], set()
        for path, data in sorted(tree.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest:
                parts = rest.split("/")
                for depth in range(1, len(parts) if recursive else 2):
                    dirs.add(base + "/".join(parts[:depth]))
                if not recursive:
                    continue
            out.append({"type": "file", "path": path, "size": len(data),
                        "oid": hashlib.sha1(data).hexdigest()})
        out += [{"type": "directory", "path": d, "oid": sha, "size": 0} for d in sorted(dirs)]
        return out


def populate_cache(cache: str | Path, kind: str, repo_id: str, folder: str | Path) -> str:
    """Every file under `folder` as commit `sha` of `repo_id` (`kind`: models or datasets) in the Hub cache at
    `cache` (HF_HUB_CACHE), exactly as snapshot_download would have left it; returns the sha."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    sha = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()).hexdigest()
    repo = Path(cache, f"{kind}--{repo_id.replace('/', '--')}")
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / sha / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(Path(name).parts) + 1), "blobs", blob.name))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return sha
