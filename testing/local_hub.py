"""A local stand-in for the Hugging Face Hub, for testing downloads without a network.

It serves one dataset repository at one commit over HTTP, speaking the part of the Hub's API that
`huggingface_hub.snapshot_download` uses for a dataset: the revision info
(`/api/datasets/REPO/revision/REV`), the recursive file listing (`/api/datasets/REPO/tree/REV`) and
the file downloads (`HEAD`/`GET /datasets/REPO/resolve/REV/PATH`, with the `X-Repo-Commit` and ETag
headers the client checks). Unknown revisions and files get the Hub's 404 with its `X-Error-Code`
(RevisionNotFound, EntryNotFound, RepoNotFound), so the client raises the errors it raises for the
real Hub. Point a process at it with HF_ENDPOINT=hub.endpoint.

    with LocalHub("a-m-team/AM-Thinking-v1-Distilled", files, commit="3697c18...") as hub:
        subprocess.run([...], env={**os.environ, "HF_ENDPOINT": hub.endpoint})
        hub.requests   # [(method, path), ...] as received
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class LocalHub:
    """Serves `files` ({path in repo: bytes}) of the dataset `repo` at `commit` (also reachable as
    `branch`), on 127.0.0.1 at a free port, from a background thread."""

    def __init__(self, repo: str, files: dict[str, bytes], commit: str, branch: str = "main"):
        self.repo, self.files, self.commit, self.branch = repo, dict(files), commit, branch
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

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
        api, resolve = f"/api/datasets/{self.repo}/", f"/datasets/{self.repo}/resolve/"
        if path.startswith(api + "revision/"):
            self._revision_info(request, path.removeprefix(api + "revision/"), body)
        elif path.startswith(api + "tree/"):
            self._tree(request, path.removeprefix(api + "tree/"), body)
        elif path.startswith(resolve):
            revision, _, file = path.removeprefix(resolve).partition("/")
            self._file(request, revision, file, body)
        else:
            self._error(request, 404, "RepoNotFound", f"Repository not found: {path}")

    def _known(self, revision: str) -> bool:
        return revision in (self.commit, self.branch)

    def _revision_info(self, request, revision: str, body: bool) -> None:
        if not self._known(revision):
            return self._error(request, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        siblings = [{"rfilename": name} for name in sorted(self.files)]
        self._json(request, {"id": self.repo, "sha": self.commit, "siblings": siblings}, body)

    def _tree(self, request, revision: str, body: bool) -> None:
        revision = revision.split("/", 1)[0]
        if not self._known(revision):
            return self._error(request, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        entries = [
            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for name, data in sorted(self.files.items())
        ]
        self._json(request, entries, body)

    def _file(self, request, revision: str, file: str, body: bool) -> None:
        if not self._known(revision):
            return self._error(request, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if file not in self.files:
            return self._error(request, 404, "EntryNotFound", f"{file} does not exist at {revision}")
        data = self.files[file]
        request.send_response(200)
        request.send_header("Content-Type", "application/octet-stream")
        request.send_header("Content-Length", str(len(data)))
        request.send_header("X-Repo-Commit", self.commit)
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
