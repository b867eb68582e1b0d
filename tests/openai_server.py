"""A real OpenAI-compatible chat server on loopback, and a fault-injecting proxy in front of it.

The server answers ``POST /v1/chat/completions`` by the protocol: a message until the partner
has proposed, then a proposal. The proxy forwards to it but, per a script of faults, delays a
request, drops the connection, or answers 429/500 first.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from parlay import prompts


def _completion(body: dict) -> dict:
    last = body["messages"][-1]["content"]
    owed = last == prompts.protocol_lines()["partner_proposed"]
    n = sum(m["role"] == "assistant" for m in body["messages"])
    text = "[propose] (0 books, 0 hats, 0 balls)" if owed or n >= 1 else "[message] you can have everything"
    return {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split()), "total_tokens": 10},
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def _start(handler) -> tuple[_Server, str]:
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def start_chat_server() -> tuple[_Server, str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data = json.dumps(_completion(body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return _start(Handler)


def start_fault_proxy(upstream: str, faults: list[str]) -> tuple[_Server, str, dict]:
    """Faults are taken in order, one per request: 'ok', 'delay', 'drop', '429', '500'."""
    script = deque(faults)
    lock = threading.Lock()
    seen = {"requests": 0, "faults": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                fault = script.popleft() if script else "ok"
                seen["requests"] += 1
                seen["faults"] += fault != "ok"
            if fault == "drop":
                self.connection.close()
                return
            if fault in ("429", "500"):
                data = json.dumps({"error": {"message": f"injected {fault}"}}).encode()
                self.send_response(int(fault))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if fault == "delay":
                time.sleep(0.3)
            req = urllib.request.Request(
                upstream + "/chat/completions", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                data = resp.read()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server, url = _start(Handler)
    return server, url, seen
