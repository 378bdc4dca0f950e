"""A local stand-in for the few Hugging Face Hub endpoints a model upload uses.

Tests cannot reach the Hub, so they point the real ``huggingface_hub`` client at this
server (HF_ENDPOINT / ``HfApi(endpoint=...)``) and check what arrived. It speaks, as the
Hub does: repo info (GET /api/models/{id}[/revision/{rev}]), repo creation (POST
/api/repos/create), branch creation (POST /api/models/{id}/branch/{b}), preupload
(which files go through LFS: *.safetensors here, as on the Hub), the LFS batch API with
the "basic" transfer (one PUT per object, sha256 checked), the NDJSON commit, and the
model card check (POST /api/validate-yaml). Hub
uploads normally go through Xet storage, a separate chunked protocol; clients talking
to this stand-in set HF_HUB_DISABLE_XET=1 and use the LFS path instead.

Every request's Authorization header is recorded, so tests can assert the token was
sent; a request with a different token gets the Hub's 401 "Invalid credentials".
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict[str, Any]] = field(default_factory=list)


class HubStandIn:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Authorization)
        self.cards: list[str] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_POST(self) -> None:
                hub._handle(self, "POST")

            def do_PUT(self) -> None:
                hub._handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- plumbing --------------------------------------------------------------------------

    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: Any = None,
               headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body if body is not None else {}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = urlsplit(h.path).path
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        auth = h.headers.get("Authorization", "")
        with self.lock:
            self.requests.append((method, path, auth))
        if path.startswith("/lfs-upload/"):  # pre-signed URLs on the real Hub: no token
            return self._lfs_put(h, path.rsplit("/", 1)[1], body)
        if auth != f"Bearer {self.token}":
            return self._reply(h, 401, {"error": "Invalid credentials in Authorization header"},
                               {"X-Error-Message": "Invalid credentials in Authorization header"})
        parts = [unquote(p) for p in path.strip("/").split("/")]
        with self.lock:
            if method == "POST" and parts == ["api", "validate-yaml"]:  # the model card's front matter
                card = json.loads(body).get("content", "")
                self.cards.append(card)
                ok = card.startswith("---\n") and "\n---\n" in card[4:]
                return self._reply(h, 200 if ok else 400,
                                   {"errors": [] if ok else [{"message": "no YAML front matter"}], "warnings": []})
            if method == "POST" and parts[:3] == ["api", "repos", "create"]:
                return self._create_repo(h, json.loads(body))
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
                repo = self.repos.get(repo_id)
                if repo is None:
                    return self._reply(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if method == "GET" and (not rest or rest[0] == "revision"):
                    rev = rest[1] if len(rest) > 1 else "main"
                    if rev not in repo.branches:
                        return self._reply(h, 404, {"error": "Revision not found"},
                                           {"X-Error-Code": "RevisionNotFound"})
                    files = repo.branches[rev]
                    return self._reply(h, 200, {"id": repo_id, "private": repo.private, "sha": self._sha(repo, rev),
                                                "siblings": [{"rfilename": f} for f in sorted(files)]})
                if method == "POST" and rest[:1] == ["branch"]:
                    if rest[1] in repo.branches:
                        return self._reply(h, 409, {"error": "Branch already exists"})
                    repo.branches[rest[1]] = dict(repo.branches["main"])
                    return self._reply(h, 200, {})
                if method == "POST" and rest[:1] == ["preupload"]:
                    files = json.loads(body)["files"]
                    return self._reply(h, 200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                         "shouldIgnore": False} for f in files]})
                if method == "POST" and rest[:1] == ["commit"]:
                    return self._commit(h, repo_id, repo, rest[1], body)
            if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == [
                    "info", "lfs", "objects", "batch"]:
                req = json.loads(body)
                objects = [{"oid": o["oid"], "size": o["size"],
                            "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}}}
                           for o in req["objects"] if o["oid"] not in self.lfs]
                return self._reply(h, 200, {"transfer": "basic", "objects": objects})
        return self._reply(h, 404, {"error": f"stand-in does not serve {method} {path}"})

    @staticmethod
    def _sha(repo: Repo, rev: str) -> str:
        files = repo.branches[rev]
        return hashlib.sha1(json.dumps(sorted((k, len(v)) for k, v in files.items())).encode()).hexdigest()

    def _create_repo(self, h: BaseHTTPRequestHandler, req: dict[str, Any]) -> None:
        repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
        if repo_id in self.repos:
            return self._reply(h, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        # Clients send "visibility" (huggingface_hub 1.x) or "private" (older ones).
        self.repos[repo_id] = Repo(private=req.get("visibility") == "private" or bool(req.get("private")))
        return self._reply(h, 200, {"url": f"{self.url}/{repo_id}"})

    def _lfs_put(self, h: BaseHTTPRequestHandler, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._reply(h, 400, {"error": "sha256 mismatch"})
        with self.lock:
            self.lfs[oid] = body
        return self._reply(h, 200, {})

    def _commit(self, h: BaseHTTPRequestHandler, repo_id: str, repo: Repo, rev: str, body: bytes) -> None:
        if rev not in repo.branches:
            return self._reply(h, 404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
        header: dict[str, Any] = {}
        files = dict(repo.branches[rev])
        for line in body.splitlines():
            item = json.loads(line)
            v = item["value"]
            if item["key"] == "header":
                header = v
            elif item["key"] == "file":
                files[v["path"]] = base64.b64decode(v["content"])
            elif item["key"] == "lfsFile":
                if v["oid"] not in self.lfs:
                    return self._reply(h, 400, {"error": f"LFS object {v['oid']} was never uploaded"})
                files[v["path"]] = self.lfs[v["oid"]]
        repo.branches[rev] = files
        sha = self._sha(repo, rev)
        repo.commits.append({"branch": rev, "message": header.get("summary"), "files": sorted(files), "sha": sha})
        url = f"{self.url}/{repo_id}/commit/{sha}"
        return self._reply(h, 200, {"success": True, "commitOid": sha, "commitUrl": url})
