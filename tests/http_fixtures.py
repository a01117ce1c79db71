"""A scripted OpenAI-compatible chat server on 127.0.0.1, shared by the teacher tests.

Only remote services are mocked, and only at their HTTP boundary: the teachers' real HTTP client talks to this.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
