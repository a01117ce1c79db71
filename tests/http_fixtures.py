"""A scripted OpenAI-compatible chat server on 127.0.0.1, shared by the teacher tests.

Only remote services are mocked, and only at their HTTP boundary: the teachers' real HTTP client talks to this.
"""

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def completion(content):
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "test-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class ScriptedServer:
    """Answers POST /v1/chat/completions: first from `script` (status, headers, body, delay), then `default`.

    A script status of "drop" closes the connection without answering; with `die_after = N` the server shuts down
    for good on request N + 1.
    """

    def __init__(self, default):
        self.script, self.default, self.requests = [], default, []
        self.die_after = None
        self.closed = False
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                    dying = server.die_after is not None and len(server.requests) > server.die_after
                    step = server.script.pop(0) if server.script and not dying else None
                if dying:  # the server goes down: this request gets no answer, later ones no connection
                    threading.Thread(target=server.close, daemon=True).start()
                    self.close_connection = True
                    return
                status, headers, payload, delay = step or (200, {}, completion(server.default(body)), 0)
                time.sleep(delay)
                if status == "drop":  # connection closed without a response
                    self.close_connection = True
                    return
                data = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
                try:
                    self.send_response(status)
                    for key, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeHub:
    """The few Hub endpoints `create_repo` + `upload_folder` call; files from the commit land in `received`."""

    def __init__(self, received: Path):
        self.received, self.calls = received, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def reply(self, payload, status=200):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.calls.append((self.path, self.headers.get("authorization")))
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    hub.created = request
                    return self.reply({"url": f"{hub.url}/datasets/{request['organization']}/{request['name']}"})
                if self.path == "/api/validate-yaml":
                    return self.reply({"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    # Everything as "regular" files: their content comes base64-encoded in the commit.
                    return self.reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                if "/commit/" in self.path:
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            target = hub.received / item["value"]["path"]
                            target.parent.mkdir(parents=True, exist_ok=True)
                            target.write_bytes(base64.b64decode(item["value"]["content"]))
                    return self.reply({"commitUrl": f"{hub.url}/datasets/me/scene/commit/{'a' * 40}", "commitOid": "a" * 40})
                self.reply({"error": f"not faked: {self.path}"}, status=404)

            def do_GET(self):
                hub.calls.append((self.path, None))
                self.reply({"error": f"not faked: {self.path}"}, status=404)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
