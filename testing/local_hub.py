"""A local stand-in for the Hugging Face Hub, for testing downloads without a network.

It serves dataset repositories, each at one commit, over HTTP, speaking the part of the Hub's API that
`huggingface_hub.snapshot_download` uses for a dataset: the revision info
(`/api/datasets/REPO/revision/REV`), the recursive file listing (`/api/datasets/REPO/tree/REV`) and
the file downloads (`HEAD`/`GET /datasets/REPO/resolve/REV/PATH`, with the `X-Repo-Commit` and ETag
headers the client checks). Unknown revisions and files get the Hub's 404 with its `X-Error-Code`
(RevisionNotFound, EntryNotFound, RepoNotFound), and a gated repository answers a request without its
token with the Hub's 401 GatedRepo, so the client raises the errors it raises for the real Hub. Point a
process at it with HF_ENDPOINT=hub.endpoint.

    with LocalHub("a-m-team/AM-Thinking-v1-Distilled", files, commit="3697c18...") as hub:
        hub.add("Idavidrein/gpqa", more_files, commit="633f5ee...", token="hf_test")   # a gated one
        subprocess.run([...], env={**os.environ, "HF_ENDPOINT": hub.endpoint})
        hub.requests   # [(method, path), ...] as received
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class _Repo:
    files: dict[str, bytes]  # {path in the repository: content}
    commit: str
    branch: str
    token: str | None  # set: gated, served only to a request bearing this token

    def knows(self, revision: str) -> bool:
        return revision in (self.commit, self.branch)


class LocalHub:
    """Serves `files` ({path in repo: bytes}) of the dataset `repo` at `commit` (also reachable as
    `branch`), and any repository `add`ed, on 127.0.0.1 at a free port, from a background thread."""

    def __init__(
        self, repo: str, files: dict[str, bytes], commit: str, branch: str = "main", token: str | None = None
    ):
        self.repos: dict[str, _Repo] = {}
        self.add(repo, files, commit, branch, token)
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def add(
        self, repo: str, files: dict[str, bytes], commit: str, branch: str = "main", token: str | None = None
    ) -> LocalHub:
        """Serves one more dataset repository; with `token`, a gated one."""
        self.repos[repo] = _Repo(dict(files), commit, branch, token)
        return self

    @classmethod
    def from_directory(cls, repo: str, root: str | Path, commit: str) -> LocalHub:
        root = Path(root)
        files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        return cls(repo, files, commit)

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # Routing ------------------------------------------------------------------------------------------

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: tests read hub.requests instead
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        return Handler

    def _serve(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        self.requests.append((request.command, path))
        for name, repo in self.repos.items():
            api, resolve = f"/api/datasets/{name}/", f"/datasets/{name}/resolve/"
            if not path.startswith((api, resolve)):
                continue
            if repo.token is not None and request.headers.get("Authorization") != f"Bearer {repo.token}":
                return self._error(request, 401, "GatedRepo", f"Access to dataset {name} is restricted.")
            if path.startswith(api + "revision/"):
                return self._revision_info(request, repo, name, path.removeprefix(api + "revision/"), body)
            if path.startswith(api + "tree/"):
                return self._tree(request, repo, path.removeprefix(api + "tree/"), body)
            if path.startswith(resolve):
                revision, _, file = path.removeprefix(resolve).partition("/")
                return self._file(request, repo, revision, file, body)
        self._error(request, 404, "RepoNotFound", f"Repository not found: {path}")

    def _revision_info(self, request, repo: _Repo, name: str, revision: str, body: bool) -> None:
        if not repo.knows(revision):
            return self._error(request, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        siblings = [{"rfilename": file} for file in sorted(repo.files)]
        self._json(request, {"id": name, "sha": repo.commit, "siblings": siblings}, body)

    def _tree(self, request, repo: _Repo, revision: str, body: bool) -> None:
        revision = revision.split("/", 1)[0]
        if not repo.knows(revision):
            return self._error(request, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        entries = [
            {"type": "file", "path": file, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for file, data in sorted(repo.files.items())
        ]
        self._json(request, entries, body)

    def _file(self, request, repo: _Repo, revision: str, file: str, body: bool) -> None:
        if not repo.knows(revision):
            return self._error(request, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if file not in repo.files:
            return self._error(request, 404, "EntryNotFound", f"{file} does not exist at {revision}")
        data = repo.files[file]
        request.send_response(200)
        request.send_header("Content-Type", "application/octet-stream")
        request.send_header("Content-Length", str(len(data)))
        request.send_header("X-Repo-Commit", repo.commit)
        request.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        request.end_headers()
        if body:
            request.wfile.write(data)

    @staticmethod
    def _json(request, payload, body: bool) -> None:
        data = json.dumps(payload).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if body:
            request.wfile.write(data)

    @staticmethod
    def _error(request, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.send_header("X-Error-Code", code)
        request.send_header("X-Error-Message", message)
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(data)
