"""A local stand-in for the Hugging Face Hub, for tests: loopback only, in memory, stops by itself.

It speaks the part of the Hub HTTP API that `huggingface_hub` uses to create repositories and branches, upload
(preupload, LFS batch + basic PUT, NDJSON commit, YAML validation) and download (`resolve`, `tree`, repo info). Point
`HF_ENDPOINT` at `server.url`, set `HF_TOKEN` to `server.token` and `HF_HUB_DISABLE_XET=1` (no Xet storage here).

    with LocalHub() as hub:
        ...  # hub.url, hub.token, hub.files("user/repo"), hub.requests

`fail` makes a stage (`"commit"`, `"lfs"`, `"preupload"`) answer 507, which the client does not retry, to test
failed pushes; `"truncate"` and `"corrupt"` make a commit succeed but store the files it adds damaged (cut to half
their length, or with their first byte flipped), to test that a push verifies what the Hub holds;
`"<stage>:user/repo"` (e.g. `"lfs:user/repo"`, `"truncate:user/repo"`) limits any of them to one repository.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "tester"
TOKEN = "hf_local_test_token"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # ref name -> commit oid
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # oid -> {path: content}
    lfs_paths: set[str] = field(default_factory=set)
    num_prs: int = 0


class HubState:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.lock = threading.Lock()
        self.requests: list[str] = []
        self.fail: set[str] = set()

    def new_commit(self, repo: Repo, files: dict[str, bytes], message: str) -> str:
        oid = hashlib.sha1(json.dumps([message, sorted(files), time.time_ns()]).encode()).hexdigest()
        repo.commits[oid] = files
        return oid

    def resolve(self, repo: Repo, revision: str) -> str | None:
        if revision in repo.branches:
            return repo.branches[revision]
        return revision if revision in repo.commits else None


class Handler(BaseHTTPRequestHandler):
    server_version = "LocalHub/1"
    protocol_version = "HTTP/1.1"

    # ---- plumbing
    @property
    def state(self) -> HubState:
        return self.server.state  # type: ignore[attr-defined]

    def log_message(self, *args):  # keep pytest output clean
        pass

    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send(self, status: int, payload=None, headers: dict | None = None, head: bool = False) -> None:
        if isinstance(payload, bytes | str):
            data = payload.encode() if isinstance(payload, str) else payload
            kind = "application/octet-stream" if isinstance(payload, bytes) else "text/plain"
        else:
            data, kind = json.dumps(payload if payload is not None else {}).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def error(self, status: int, code: str, message: str, head: bool = False) -> None:
        self.send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head=head)

    def user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return USER if auth == f"Bearer {TOKEN}" else None

    def route(self, method: str) -> None:
        parts = urlsplit(self.path)
        self.query = parse_qs(parts.query)
        self.state.requests.append(f"{method} {parts.path}")
        for pattern, name in ROUTES:
            if name.startswith(method.lower() + "_"):
                match = re.fullmatch(pattern, parts.path)
                if match:
                    with self.state.lock:
                        return getattr(self, name)(*[unquote(g) for g in match.groups()])
        self.error(404, "NotFound", f"no route for {method} {parts.path}")

    def do_GET(self):
        self.route("GET")

    def do_HEAD(self):
        self.route("HEAD")

    def do_POST(self):
        self.route("POST")

    def do_PUT(self):
        self.route("PUT")

    def failing(self, stage: str, repo_id: str) -> bool:
        """Whether `stage` is set to fail (or damage) for every repository or for `repo_id`."""
        return bool({stage, f"{stage}:{repo_id}"} & self.state.fail)

    def repo(self, repo_id: str, write: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        needs_auth = write or (repo is not None and repo.private)
        if repo is None or (needs_auth and self.user() is None):
            self.error(401 if self.user() is None else 404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        if write and not repo_id.startswith(USER + "/"):
            self.error(403, "Forbidden", f"{USER} cannot write to {repo_id}")
            return None
        return repo

    # ---- API
    def get_whoami(self):
        if self.user() is None:
            return self.error(401, "Unauthorized", "Invalid credentials in Authorization header")
        self.send(200, {"type": "user", "name": USER, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

    def post_create(self):
        payload = json.loads(self.body() or b"{}")
        if self.user() is None:
            return self.error(401, "Unauthorized", "Invalid credentials in Authorization header")
        namespace = payload.get("organization") or USER
        repo_id = f"{namespace}/{payload['name']}"
        if namespace != USER:
            return self.error(403, "Forbidden", f"{USER} cannot create repositories in {namespace}")
        if repo_id in self.state.repos:
            return self.error(409, "RepoExists", "You already created this model repo")
        repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        repo.branches["main"] = self.state.new_commit(repo, {".gitattributes": b"*.safetensors filter=lfs\n"}, "init")
        self.state.repos[repo_id] = repo
        self.send(200, {"url": f"{self.base()}/{repo_id}", "name": repo_id, "id": repo_id})

    def post_validate_yaml(self):
        content = json.loads(self.body()).get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, flags=re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            return self.send(400, f"Invalid YAML: {error}")
        if not isinstance(meta, dict | type(None)):
            return self.send(400, "YAML metadata must be a mapping")
        tags = (meta or {}).get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            return self.send(400, '"tags" must be an array of strings')
        self.send(200, {"errors": [], "warnings": []})

    def post_branch(self, repo_id, branch):
        repo = self.repo(repo_id, write=True)
        if repo is None:
            return
        if branch in repo.branches:
            return self.error(409, "BranchExists", f"Branch {branch} already exists")
        start = json.loads(self.body() or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = self.state.resolve(repo, start)
        self.send(200, {})

    def post_preupload(self, repo_id, revision):
        repo = self.repo(repo_id, write=True)
        if repo is None:
            return
        if self.failing("preupload", repo_id):
            return self.error(507, "Storage", "preupload failed (injected)")
        files = json.loads(self.body())["files"]
        modes = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                "shouldIgnore": False,
                "oid": None,
            }
            for f in files
        ]
        self.send(200, {"files": modes, "commitOid": self.state.resolve(repo, revision)})

    def post_lfs_batch(self, repo_id):
        repo = self.repo(repo_id, write=True)
        if repo is None:
            return
        payload = json.loads(self.body())
        fail = self.failing("lfs", repo_id)
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs or fail:
                href = f"{self.base()}/lfs-upload/{obj['oid']}" + ("?fail=1" if fail else "")
                entry["actions"] = {"upload": {"href": href}}
            objects.append(entry)
        self.send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def put_lfs_upload(self, oid):
        data = self.body()
        if "lfs" in self.state.fail or self.query.get("fail"):
            return self.error(507, "Storage", "LFS storage failed (injected)")
        if hashlib.sha256(data).hexdigest() != oid:
            return self.error(400, "BadOid", "content does not match its sha256")
        self.state.lfs[oid] = data
        self.send(200, {})

    def post_commit(self, repo_id, revision):
        repo = self.repo(repo_id, write=True)
        if repo is None:
            return
        lines = [json.loads(line) for line in self.body().splitlines() if line.strip()]
        if self.failing("commit", repo_id):
            return self.error(507, "Storage", "commit failed (injected)")
        parent = self.state.resolve(repo, revision)
        if parent is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files, lfs_paths, header = dict(repo.commits[parent]), set(), {}
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.state.lfs:
                    return self.error(422, "LfsMissing", f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self.state.lfs[value["oid"]]
                lfs_paths.add(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                files = {
                    p: c for p, c in files.items() if p != value["path"] and not p.startswith(value["path"] + "/")
                }
        added = [line["value"]["path"] for line in lines if line["key"] in ("file", "lfsFile")]
        damage = {d for d in ("truncate", "corrupt") if self.failing(d, repo_id)}
        for path in added:
            if "truncate" in damage:
                files[path] = files[path][: len(files[path]) // 2]
            if "corrupt" in damage and files[path]:
                files[path] = bytes([files[path][0] ^ 0xFF]) + files[path][1:]
        oid = self.state.new_commit(repo, files, header.get("summary", ""))
        repo.lfs_paths |= lfs_paths
        answer = {"commitUrl": f"{self.base()}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}
        if self.query.get("create_pr") == ["1"]:
            repo.num_prs += 1
            repo.branches[f"refs/pr/{repo.num_prs}"] = oid
            answer["pullRequestUrl"] = f"{self.base()}/{repo_id}/discussions/{repo.num_prs}"
        else:
            repo.branches[revision] = oid
        self.send(200, answer)

    def get_info(self, repo_id, revision="main"):
        repo = self.repo(repo_id)
        if repo is None:
            return
        oid = self.state.resolve(repo, revision)
        if oid is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        siblings = [{"rfilename": p} for p in sorted(repo.commits[oid])]
        self.send(200, {"id": repo_id, "modelId": repo_id, "sha": oid, "private": repo.private, "siblings": siblings})

    def get_tree(self, repo_id, revision, path=""):
        repo = self.repo(repo_id)
        if repo is None:
            return
        oid = self.state.resolve(repo, revision)
        if oid is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries = []
        for p, content in sorted(repo.commits[oid].items()):
            if p.startswith(prefix):
                entry = {"type": "file", "path": p, "size": len(content), "oid": git_blob_sha1(content)}
                if p in repo.lfs_paths:
                    entry["lfs"] = {
                        "oid": hashlib.sha256(content).hexdigest(),
                        "size": len(content),
                        "pointerSize": 134,
                    }
                entries.append(entry)
        if prefix and not entries:
            return self.error(404, "EntryNotFound", f"{path} does not exist on {revision}")
        self.send(200, entries)

    def get_resolve(self, repo_id, revision, path, head=False):
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and self.user() is None):
            return self.error(401, "RepoNotFound", f"Repository {repo_id} not found", head=head)
        oid = self.state.resolve(repo, revision)
        if oid is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        content = repo.commits[oid].get(path)
        if content is None:
            return self.error(404, "EntryNotFound", f"Entry not found: {path}", head=head)
        etag = hashlib.sha256(content).hexdigest() if path in repo.lfs_paths else git_blob_sha1(content)
        headers = {"X-Repo-Commit": oid, "ETag": f'"{etag}"'}
        if path in repo.lfs_paths:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(content))})
        self.send(200, content, headers, head=head)

    def head_resolve(self, repo_id, revision, path):
        self.get_resolve(repo_id, revision, path, head=True)


REPO = r"/([\w.-]+/[\w.-]+)"
ROUTES = [
    (r"/api/whoami-v2", "get_whoami"),
    (r"/api/repos/create", "post_create"),
    (r"/api/validate-yaml", "post_validate_yaml"),
    (rf"/api/models{REPO}/branch/([^/]+)", "post_branch"),
    (rf"/api/models{REPO}/preupload/([^/]+)", "post_preupload"),
    (rf"/api/models{REPO}/commit/([^/]+)", "post_commit"),
    (rf"{REPO}\.git/info/lfs/objects/batch", "post_lfs_batch"),
    (r"/lfs-upload/([0-9a-f]{64})", "put_lfs_upload"),
    (rf"/api/models{REPO}/revision/([^/]+)", "get_info"),
    (rf"/api/models{REPO}", "get_info"),
    (rf"/api/models{REPO}/tree/([^/]+)/?(.*)", "get_tree"),
    (rf"{REPO}/resolve/([^/]+)/(.+)", "get_resolve"),
    (rf"{REPO}/resolve/([^/]+)/(.+)", "head_resolve"),
]


class LocalHub:
    """The server, run in a daemon thread on 127.0.0.1; stops on `close()`, on leaving `with`, or after `lifetime`."""

    token = TOKEN
    user = USER

    def __init__(self, lifetime: float = 300.0):
        self.state = HubState()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.state = self.state
        self.httpd.timeout = 5
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._timer = threading.Timer(lifetime, self.close)
        self._timer.daemon = True
        self._closed = False

    def start(self) -> LocalHub:
        self._thread.start()
        self._timer.start()
        return self

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._timer.cancel()
            if self._thread.is_alive():
                self.httpd.shutdown()
            self.httpd.server_close()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def fail(self) -> set[str]:
        return self.state.fail

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Files of a revision (branch, `refs/pr/N` or commit oid); empty when the repo does not exist."""
        repo = self.state.repos.get(repo_id)
        oid = self.state.resolve(repo, revision) if repo else None
        return dict(repo.commits[oid]) if oid else {}

    def env(self, **extra: str) -> dict[str, str]:
        """Environment variables pointing `huggingface_hub` (in a subprocess) at this server."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_TOKEN": self.token,
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            **extra,
        }


def closed_endpoint() -> str:
    """A loopback URL nobody listens on: a server's, closed right away."""
    server = LocalHub()
    url = server.url
    server.close()
    return url
