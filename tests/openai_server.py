"""A real OpenAI-compatible chat server on loopback, and a fault-injecting proxy in front of it.

The server answers ``POST /v1/chat/completions`` by the protocol: a message until the partner
has proposed, then a proposal (a model named ``runaway…`` answers 100,000 characters
instead). It also takes file uploads and runs pretend fine-tuning jobs
(``/v1/files``, ``/v1/fine_tuning/jobs``) the way the OpenAI API reports them. The proxy
forwards to it but, per a script of faults, delays a request, drops the connection, or answers
429/500 first.
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
    if body["messages"][0]["content"] == prompts.judge_prompt():  # asked to judge: rate by length
        text = f"{min(10, len(body['messages'][1]['content']) // 200)} - a fair effort"
        return _chat(body, text)
    if body["messages"][0]["content"] == prompts.consistency_prompt():  # asked to check facts: rules of thumb
        message = body["messages"][1]["content"].rsplit("The message:", 1)[-1]
        return _chat(body, "Yes, too many." if any(d in message for d in "56789") else "No.")
    if body["model"].startswith("runaway"):  # an endpoint that does not stop: 100,000 characters
        return _chat(body, "[message] " + "and more " * 11_111)
    last = body["messages"][-1]["content"]
    owed = last == prompts.protocol_lines()["partner_proposed"]
    n = sum(m["role"] == "assistant" for m in body["messages"])
    text = "[propose] (0 books, 0 hats, 0 balls)" if owed or n >= 1 else "[message] you can have everything"
    return _chat(body, text)


def _chat(body: dict, text: str) -> dict:
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


def _job(job_id: str, model: str, file_id: str, polls: int) -> dict:
    """A fine-tuning job that validates, runs and then succeeds — or fails, for a model named fail*."""
    status = ["validating_files", "running", "running"][polls] if polls < 3 else None
    failed = model.startswith("fail")
    if status is None:
        status = "failed" if failed else "succeeded"
    return {
        "id": job_id,
        "object": "fine_tuning.job",
        "created_at": 0,
        "model": model,
        "status": status,
        "training_file": file_id,
        "validation_file": None,
        "fine_tuned_model": f"ft:{model}:parlay:1" if status == "succeeded" else None,
        "error": {"message": "bad file", "code": "invalid_file", "param": None} if status == "failed" else None,
        "finished_at": None,
        "hyperparameters": {"n_epochs": 1},
        "organization_id": "org-test",
        "result_files": [],
        "seed": 0,
        "trained_tokens": None,
    }


def start_chat_server() -> tuple[_Server, str]:
    """Chat completions, plus the file upload and fine-tuning job endpoints; ``server.uploads``
    keeps the uploaded request bodies."""
    jobs: dict[str, dict] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path.endswith("/files"):
                server.uploads.append(raw)
                file_id = f"file-{len(server.uploads)}"
                self._send({"id": file_id, "object": "file", "bytes": len(raw), "created_at": 0,
                            "filename": "train.jsonl", "purpose": "fine-tune", "status": "processed"})  # fmt: skip
            elif self.path.endswith("/fine_tuning/jobs"):
                body = json.loads(raw)
                job_id = f"ftjob-{len(jobs) + 1}"
                jobs[job_id] = {"model": body["model"], "file": body["training_file"], "polls": 0}
                self._send(_job(job_id, body["model"], body["training_file"], 0))
            else:
                self._send(_completion(json.loads(raw)))

        def do_GET(self):
            job_id = self.path.rstrip("/").rsplit("/", 1)[-1]
            job = jobs[job_id]
            job["polls"] += 1
            self._send(_job(job_id, job["model"], job["file"], job["polls"]))

    server, url = _start(Handler)
    server.uploads = []
    return server, url


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
                self.send_header("Retry-After-Ms", "10")  # a short wait, as servers may ask (the SDK honours it)
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
