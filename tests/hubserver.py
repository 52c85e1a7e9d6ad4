"""A small Hugging Face Hub-compatible HTTP server for tests, on 127.0.0.1.

It serves repos from local folders and answers what `huggingface_hub` calls: model info, the file tree,
`resolve` with HEAD/GET (ETag, X-Repo-Commit, Content-Length, Range), and model search. Switches make a
repo gated (401 with X-Error-Code: GatedRepo), refuse tokens the server doesn't know, cut a connection
mid-file, or send slowly or at a crawl.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

#: A repo of the tests (conftest's huge_repo) whose headers say a trillion parameters.
HUGE_REPO = "TestOrg/huge-llama"

#: Weights, which the Hub keeps in LFS with their sha256.
LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass
class Repo:
    folder: Path
    gated: bool = False
    forbidden: bool = False
    downloads: int = 0

    @property
    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file() and not p.name.startswith("."))

    @property
    def sha(self) -> str:
        digest = hashlib.sha1()
        for path in self.files:
            digest.update(str(path.relative_to(self.folder)).encode())
            digest.update(str(path.stat().st_size).encode())
        return digest.hexdigest()


def _param_count(folder: Path) -> int:
    """What the Hub reports: the shapes in each safetensors header, taken as they are (the huge repo's header
    promises far more data than its file holds, which chatapp's own reader rightly refuses)."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def _etag(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sibling(folder: Path, path: Path) -> dict:
    """A file as the Hub lists it with files_metadata: weights are in LFS, with their sha256."""
    entry = {"rfilename": str(path.relative_to(folder)), "size": path.stat().st_size}
    if path.suffix in LFS_SUFFIXES:
        entry["lfs"] = {"sha256": _etag(path), "size": path.stat().st_size, "pointerSize": 134}
    return entry


@dataclass
class HubServer:
    repos: dict[str, Repo] = field(default_factory=dict)
    #: Each GET of a file body takes the first number here, if any, and cuts the connection after that many
    #: bytes: [5_000_000] is one cut mid-file, [20_000_000, 0, 0, ...] a network that then stays down.
    drops: list[int] = field(default_factory=list)
    #: Sleep this long between 64 KiB blocks of a GET body, to test cancel and progress.
    block_delay_s: float = 0.0
    #: A link that slows to a crawl: after the first fast_bytes of a GET body, send at most this many bytes a
    #: second (0: no limit).
    bytes_per_s: int = 0
    fast_bytes: int = 0
    requests: list[str] = field(default_factory=list)
    #: The tokens this Hub knows; as on the Hub, any other token sent is refused with a 401 on every route.
    #: None: any token is good.
    valid_tokens: set[str] | None = None

    def add(self, repo_id: str, folder: Path, **kwargs) -> Repo:
        self.repos[repo_id] = Repo(Path(folder), **kwargs)
        return self.repos[repo_id]

    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            server_state = hub

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _Server(ThreadingHTTPServer):
    # snapshot_download opens up to 8 connections at once; the default backlog of 5 can refuse some of them
    # when this process is slow to accept (a busy test run), which looks like a flaky network.
    request_queue_size = 64


class _Handler(BaseHTTPRequestHandler):
    server_state: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    # -- helpers ---------------------------------------------------------------------------

    def _send_json(self, body, status: int = 200, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send_json({"error": message}, status, {"X-Error-Code": code, "X-Error-Message": message})

    def _repo(self, repo_id: str, *, files: bool = False) -> Repo | None:
        """The repo, or None after answering with an error. As on the Hub, a gated repo's info is public and
        its files need a token; `forbidden` is a server that answers a bare 403 with no error code."""
        repo = self.server_state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        if repo.forbidden:
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if files and repo.gated and not self.headers.get("Authorization"):
            self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must be authenticated.")
            return None
        return repo

    # -- routes ----------------------------------------------------------------------------

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        state = self.server_state
        url = urlparse(self.path)
        path = unquote(url.path)
        ranged = self.headers.get("Range")
        state.requests.append(f"{self.command} {path}" + (f" Range:{ranged}" if ranged else ""))
        parts = path.strip("/").split("/")
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        if token and state.valid_tokens is not None and token not in state.valid_tokens:
            return self._send_json(
                {"error": "Invalid credentials in Authorization header"},
                401,
                {"X-Error-Message": "Invalid credentials in Authorization header"},
            )
        if parts[:2] == ["api", "models"] and len(parts) == 2:
            return self._search(parse_qs(url.query))
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            repo = self._repo(repo_id)
            if repo is None:
                return
            rest = parts[4:]
            if not rest or rest[0] == "revision":
                return self._info(repo_id, repo)
            if rest[0] == "tree":
                return self._tree(repo)
            return self._error(404, "EntryNotFound", "unknown api route")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = "/".join(parts[:2])
            repo = self._repo(repo_id, files=True)
            if repo is None:
                return
            return self._resolve(repo, "/".join(parts[4:]))
        self._error(404, "EntryNotFound", f"no route for {path}")

    def _info(self, repo_id: str, repo: Repo) -> None:
        self._send_json(
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.sha,
                "private": False,
                "gated": "auto" if repo.gated else False,
                "downloads": repo.downloads,
                "likes": 0,
                "lastModified": "2026-11-01T00:00:00.000Z",
                "pipeline_tag": "text-generation",
                "tags": ["safetensors", "text-generation"],
                "siblings": [_sibling(repo.folder, p) for p in repo.files],
            }
        )

    def _tree(self, repo: Repo) -> None:
        entries = []
        for p in repo.files:
            entry = {
                "type": "file",
                "path": str(p.relative_to(repo.folder)),
                "size": p.stat().st_size,
                "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
            }
            if p.suffix in LFS_SUFFIXES:
                entry["lfs"] = {"oid": _etag(p), "size": p.stat().st_size, "pointerSize": 134}
            entries.append(entry)
        self._send_json(entries)

    def _search(self, query: dict) -> None:
        text = (query.get("search") or [""])[0].lower()
        limit = int((query.get("limit") or ["20"])[0])
        found = [
            {
                "id": repo_id,
                "modelId": repo_id,
                "downloads": repo.downloads,
                "likes": 0,
                "gated": "auto" if repo.gated else False,
                "pipeline_tag": "text-generation",
                "lastModified": "2026-11-01T00:00:00.000Z",
                "private": False,
                "safetensors": {"parameters": {"BF16": _param_count(repo.folder)}, "total": _param_count(repo.folder)},
            }
            for repo_id, repo in self.server_state.repos.items()
            if text in repo_id.lower()
        ]
        found.sort(key=lambda m: -m["downloads"])
        self._send_json(found[:limit])

    def _resolve(self, repo: Repo, filename: str) -> None:
        path = repo.folder / filename
        if not path.is_file():
            return self._error(404, "EntryNotFound", f"{filename} does not exist")
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        header = self.headers.get("Range")
        if header and header.startswith("bytes="):
            first, _, last = header[6:].partition("-")
            start = int(first or 0)
            end = min(int(last), size - 1) if last else size - 1
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{_etag(path)}"')
        self.send_header("X-Repo-Commit", repo.sha)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            self._stream(path, start, end)
        except (BrokenPipeError, ConnectionResetError):  # the client went away: a cancel or a kill
            self.close_connection = True

    def _stream(self, path: Path, start: int, end: int) -> None:
        state = self.server_state
        limit = None
        if state.drops and end - start + 1 > state.drops[0]:
            limit = state.drops.pop(0)
        sent = 0
        with path.open("rb") as handle:
            handle.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                crawling = state.bytes_per_s and sent >= state.fast_bytes
                block = handle.read(min(256 if crawling else 65536, remaining))
                if crawling:
                    time.sleep(len(block) / state.bytes_per_s)
                if limit is not None and sent + len(block) >= limit:
                    self.wfile.write(block[: limit - sent])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # a dropped connection, mid-file
                    return
                self.wfile.write(block)
                sent += len(block)
                remaining -= len(block)
                if state.block_delay_s:
                    time.sleep(state.block_delay_s)


def write_huge_safetensors(path: Path) -> None:
    """A safetensors file whose header says a trillion parameters, followed by only 1 MB of data: enough for
    get_safetensors_metadata, and a download of it shows as a read past the header."""
    header = {"model.embed_tokens.weight": {"dtype": "BF16", "shape": [10**6, 10**6], "data_offsets": [0, 2 * 10**12]}}
    data = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(data)) + data + bytes(1_000_000))


def weight_reads(requests: list[str]) -> list[str]:
    """The GETs of weight files among HubServer.requests."""
    return [r for r in requests if r.startswith("GET") and r.split()[1].endswith((".safetensors", ".bin"))]


def header_only(request: str) -> bool:
    """A ranged read of at most the first 100 kB: get_safetensors_metadata reading a header, not the weights."""
    _, _, rest = request.partition("Range:bytes=")
    first, _, last = rest.partition("-")
    return first == "0" and last.isdigit() and int(last) <= 100_000
