"""Real HTTP servers on 127.0.0.1 for tests, every request recorded.

``LoopbackServer`` (fetch tests): scripted responses per path; threaded (``http.server.ThreadingHTTPServer``),
HTTP/1.1 keep-alive, bounded: after ``max_requests`` requests it answers 503 and stops itself, so a
runaway client cannot keep a test alive. ``ChatCompletionsServer`` (captioner tests): an OpenAI-compatible
chat endpoint whose answers a test function decides.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Response = tuple[int, dict[str, str], bytes]


class LoopbackServer:
    """``routes``: path -> responses served in turn (the last one repeats). Unknown paths get 404.

    A response header ``X-Test-No-Length: 1`` sends the body without Content-Length and closes the
    connection (the stream ends at EOF), to test byte caps on bodies of unknown size.
    """

    def __init__(self, routes: dict[str, list[Response]], max_requests: int = 5000) -> None:
        self.routes = {k: list(v) for k, v in routes.items()}
        self.max_requests = max_requests
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._served: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.requests.append((path, {k.lower(): v for k, v in self.headers.items()}))
                    n = len(server.requests)
                    i = server._served.get(path, 0)
                    server._served[path] = i + 1
                if n > server.max_requests:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    threading.Thread(target=server.httpd.shutdown, daemon=True).start()
                    return
                responses = server.routes.get(path)
                status, headers, body = (404, {}, b"not found") if not responses else responses[min(i, len(responses) - 1)]
                self.send_response(status)
                no_length = headers.get("X-Test-No-Length") == "1"
                for k, v in headers.items():
                    if k != "X-Test-No-Length":
                        self.send_header(k, v)
                if no_length:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client abort (byte cap)
                    self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients closing keep-alive connections (byte cap, opt-out, shutdown) are expected

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def paths_requested(self) -> list[str]:
        with self._lock:
            return [p for p, _ in self.requests]

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


ChatBehaviour = Callable[[dict[str, Any], int], tuple[int, dict[str, Any], float]]


class ThreadedEndpoint:
    """A ``ThreadingHTTPServer`` on a free 127.0.0.1 port serving ``handler`` in a daemon thread, with its
    OpenAI-style base url; ``close`` stops it."""

    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ChatCompletionsServer(ThreadedEndpoint):
    """A loopback OpenAI-compatible ``/v1/chat/completions`` endpoint for the captioner client's tests.

    ``behave(body, n)`` answers the n-th request (1-based) with ``(status, JSON payload, delay_s)``; every
    request body and its headers are recorded, and the most requests in flight at once is kept.
    """

    def __init__(self, behave: ChatBehaviour) -> None:
        self.behave = behave
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                    n = len(server.bodies)
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    status, payload, delay = server.behave(body, n)
                    time.sleep(delay)
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away
                finally:
                    with server.lock:
                        server.inflight -= 1

        self.serve(Handler)


def chat_completion(text: str, finish: str = "stop", tokens: int = 5) -> dict[str, Any]:
    """A ``chat.completions`` response payload with one choice."""
    return {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"completion_tokens": tokens},
    }
