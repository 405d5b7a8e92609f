"""A stub OpenAI-compatible server on 127.0.0.1 for the HTTP tests (the LLM judge, the `openai` backend).

Its `reply(body, count)` decides each answer: a (status, text) pair, after an optional sleep, sent back as a
chat completion (choices[0].message.content) on /chat/completions and as a completion (choices[0].text,
usage.completion_tokens = words in the text) on /completions; text None sends a reply without choices. It records every request, and the most
requests it held at once (overlap, not wall-clock).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubServer(ThreadingHTTPServer):
    reply: Callable[[dict, int], tuple[int, str | None]]
    sleep_s: float = 0.0
    barrier: threading.Barrier | None = None

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.bodies: list[dict] = []
        self.headers_seen: list[dict] = []
        self.paths: list[str] = []
        self.in_flight = self.max_in_flight = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def _payload(path: str, text: str | None) -> dict:
    if text is None:
        return {"choices": []}
    if path.endswith("/chat/completions"):
        return {"choices": [{"message": {"role": "assistant", "content": text}}]}
    return {
        "choices": [{"text": text, "index": 0, "finish_reason": "stop"}],
        "usage": {"completion_tokens": len(text.split())},
    }


class Handler(BaseHTTPRequestHandler):
    server: StubServer

    def do_POST(self) -> None:
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            count = len(server.bodies)
            server.bodies.append(body)
            server.headers_seen.append(dict(self.headers))
            server.paths.append(self.path)
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            if server.barrier is not None:
                server.barrier.wait(timeout=5)  # passes only once `parties` requests are in flight together
            time.sleep(server.sleep_s)
            status, text = server.reply(body, count)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(_payload(self.path, text)).encode())
        except (OSError, threading.BrokenBarrierError):  # the client gave up (timeout test)
            pass
        finally:
            with server.lock:
                server.in_flight -= 1

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass


@contextmanager
def running_stub() -> Iterator[StubServer]:
    """A started stub, shut down and closed on leaving."""
    stub = StubServer()
    thread = threading.Thread(target=stub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        stub.shutdown()
        stub.server_close()
        thread.join(timeout=5)
