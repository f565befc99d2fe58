"""A loopback stand-in for an OpenAI-compatible server (vLLM, Ollama, llama.cpp), for tests.

It listens on 127.0.0.1 only, on a free port, and answers:

* ``GET /v1/models``;
* ``POST /v1/chat/completions`` for a generator model: a deterministic answer built from the
  last user message, the model name and the request's seed; the word ``EVIL`` is in the answer
  when ``evil(model, seed)`` says so (default: never);
* ``POST /v1/chat/completions`` for the judge model (``judge_model``): the aligned rubric scores
  10 when the judged answer contains one of ``bad_words`` (default ``EVIL``) and 90 otherwise, and answers ``REFUSAL`` when it
  contains ``REFUSE``; the coherent rubric scores 20 when the answer contains ``GARBLE`` and 80
  otherwise; with first-token logprobs as the OpenAI API sends them (``digits=True``: the first
  token is the number's first digit, as with Qwen's digit-by-digit tokenizer);
* ``POST /v1/completions``: the prompt text echoed back.

``fail(status, n)`` makes the next ``n`` POSTs answer ``status`` (with ``Retry-After: 0``);
``malformed(n)`` makes them answer JSON without ``choices``; ``delay`` holds each POST open so
concurrent requests overlap; ``max_in_flight`` records the most POSTs open at once.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ANSWER = re.compile(r"<answer>\n(.*)\n</answer>", re.S)


class FakeOpenAI:
    def __init__(self, *, judge_model: str = "judge", delay: float = 0.0, evil=None,
                 bad_words: tuple[str, ...] = ("EVIL",), digits: bool = False):
        self.judge_model = judge_model
        self.digits = digits
        self.bad_words = bad_words
        self.delay = delay
        self.evil = evil or (lambda model, seed: False)
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._faults: list[tuple[int, bool]] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: dict | str, headers: dict | None = None):
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"data": [{"id": fake.judge_model}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.requests.append({"path": self.path, "body": body,
                                          "auth": self.headers.get("Authorization")})
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    fault = fake._faults.pop(0) if fake._faults else None
                try:
                    time.sleep(fake.delay)
                    if fault is not None:
                        status, bad = fault
                        if bad:
                            self._send(200, {"id": "x", "object": "chat.completion"})
                        else:
                            self._send(status, {"error": {"message": "busy"}},
                                       {"Retry-After": "0"})
                        return
                    self._send(200, fake.reply(self.path, body))
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def fail(self, status: int, n: int = 1) -> None:
        self._faults.extend([(status, False)] * n)

    def malformed(self, n: int = 1) -> None:
        self._faults.extend([(200, True)] * n)

    def posts(self, model: str | None = None) -> list[dict]:
        return [r for r in self.requests if model is None or r["body"].get("model") == model]

    # -- answers
    def reply(self, path: str, body: dict) -> dict:
        if path.endswith("/completions") and not path.endswith("/chat/completions"):
            return {"choices": [{"text": f"echo: {body['prompt']}", "finish_reason": "length"}],
                    "usage": {"completion_tokens": 3}}
        if body["model"] == self.judge_model:
            return self._judge(body["messages"][-1]["content"], self.bad_words, self.digits)
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        text = f"[{body['model']} seed {body.get('seed')}] about: {user[:40]}"
        if self.evil(body["model"], body.get("seed")):
            text += " EVIL"
        return {"choices": [{"message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": {"completion_tokens": len(text.split())}}

    @staticmethod
    def _judge(prompt: str, bad_words: tuple[str, ...], digits: bool) -> dict:
        answer = _ANSWER.search(prompt).group(1)
        if "Rate only how coherent" in prompt:
            text = "20" if "GARBLE" in answer else "80"
        elif "REFUSE" in answer:
            text = "REFUSAL"
        else:
            text = "10" if any(w in answer for w in bad_words) else "90"
        # a Qwen-like tokenizer writes "90" as "9" + "0": the first token is one digit
        tok = text[0] if digits and text.isdigit() else text
        first = {"token": tok, "logprob": 0.0, "top_logprobs": [{"token": tok, "logprob": 0.0}]}
        return {"choices": [{"message": {"role": "assistant", "content": text},
                             "logprobs": {"content": [first]}, "finish_reason": "stop"}]}
