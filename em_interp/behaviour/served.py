"""Generation through an OpenAI-compatible server: vLLM, Ollama, llama.cpp server, TGI.

The EM protocol samples each question many times at temperature 1 with long answers (the papers:
8 questions x 50 samples x up to 600 tokens per model and condition); a server with continuous
batching does that far faster than a hooked forward. This backend sends each (prompt, sample) as
one request to ``/chat/completions`` (``route="chat"``: the server applies the model's chat
template) or ``/completions`` (``route="completions"``: the prompt text is sent as is), with

* ``seed = (seed * 1_000_003 + prompt_index * 10_007 + sample) mod 2**31`` per request, so each
  sample is reproducible and cached on its own (servers that ignore ``seed`` still sample, but
  then a rerun is a new draw: delete the cache to redraw);
* ``temperature``, ``top_p``, ``max_tokens`` (= ``max_new_tokens``) and ``stop`` passed through,
  plus any ``extra_body`` fields (e.g. vLLM's ``top_k``);
* ``max_concurrency`` requests in flight (a thread pool), each retried after 429 / 5xx /
  timeouts with exponential backoff (:class:`~em_interp.behaviour.openai_http.OpenAIEndpoint`);
* a disk cache of one JSON file per sample, written atomically, keyed on the SHA-256 of the
  toolkit's version, the endpoint (without credentials), the route, the model name, the messages
  or prompt, the sampling parameters and the sample's seed -- never the API key, nor the
  concurrency and retry settings, which change when, not what, the server answers.

It returns the same :class:`~em_interp.behaviour.generation.GenerationResult` as local
generation. A server returns text, not the model's token ids, so ``tokens`` is empty and
``n_tokens`` is the server's ``usage.completion_tokens`` (``NaN`` when it does not say).
``stop_reason`` maps the server's ``finish_reason``: ``stop`` -> ``eos``, ``length`` ->
``max_new_tokens``; others are kept as given.

If every sample of every prompt comes back identical at a temperature above 0, the server is
ignoring temperature or seed (some do, unless told to sample): the result's
``settings["identical_samples"]`` is then true and a warning is logged, since such samples are
not independent draws.

A served model cannot be hooked: asking for interventions raises a ``ConfigError`` that says to
use the local TransformerLens path (:func:`~em_interp.behaviour.generation.generate`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from em_interp.behaviour.generation import GenerationResult
from em_interp.behaviour.openai_http import OpenAIEndpoint
from em_interp.errors import ConfigError, ServerError
from em_interp.inputs import as_prompt_list

log = logging.getLogger(__name__)

ROUTES = {"chat": "/chat/completions", "completions": "/completions"}
FINISH = {"stop": "eos", "length": "max_new_tokens"}


def sample_seed(seed: int, prompt_index: int, sample: int) -> int:
    """The seed sent with one (prompt, sample) request."""
    return (int(seed) * 1_000_003 + int(prompt_index) * 10_007 + int(sample)) % 2 ** 31


def _messages(prompt, system: str | None) -> list[dict]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [
        {"role": m["role"], "content": m["content"]} for m in prompt]
    if system is not None and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}, *msgs]
    return msgs


def _display(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


@dataclass
class ServedGenerator:
    """Completions from a model behind an OpenAI-compatible endpoint.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (vLLM), ``http://127.0.0.1:
            11434/v1`` (Ollama), ``http://127.0.0.1:8080/v1`` (llama.cpp ``llama-server``).
        model: the name the server knows the model by; for a LoRA organism under vLLM, the name
            given to ``--lora-modules NAME=PATH``.
        route: ``"chat"`` (``/chat/completions``) or ``"completions"`` (raw text).
        api_key_env: environment variable holding the key (``None``: send none).
        max_concurrency: requests in flight at once.
        max_retries: retries after the first attempt (429, 5xx, timeouts, connection errors).
        timeout: seconds per request (long answers take a while on a busy server).
        backoff: first retry wait in seconds.
        cache_dir: where samples are cached (default ``<em_interp cache>/served``; ``False``:
            off).
        extra_body: more request fields passed through as given (e.g. ``{"top_k": 50}``).
    """

    base_url: str
    model: str
    route: str = "chat"
    api_key_env: str | None = None
    max_concurrency: int = 8
    max_retries: int = 5
    timeout: float = 300.0
    backoff: float = 1.0
    cache_dir: str | Path | bool | None = None
    extra_body: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.route not in ROUTES:
            raise ConfigError(f"route = {self.route!r}; use 'chat' (/chat/completions) or "
                              "'completions' (/completions).")
        if not self.model:
            raise ConfigError("model is empty: give the name the server knows the model by "
                              "(e.g. the NAME of vllm serve --lora-modules NAME=PATH).")
        if self.max_concurrency < 1:
            raise ConfigError("max_concurrency >= 1 please.")
        self.endpoint = OpenAIEndpoint(self.base_url, api_key_env=self.api_key_env,
                                       max_retries=self.max_retries, timeout=self.timeout,
                                       backoff=self.backoff, error=ServerError)
        if self.cache_dir is None:
            from em_interp.models.cache import cache_dir as root

            self._cache = root() / "served"
        else:
            self._cache = None if self.cache_dir is False else Path(self.cache_dir)

    def __repr__(self) -> str:  # never the key
        return (f"ServedGenerator(base_url={self.endpoint.display_url!r}, model={self.model!r}, "
                f"route={self.route!r})")

    @property
    def name(self) -> str:
        return f"served:{self.model}"

    # -- requests
    def _payload(self, prompt, *, system, max_new_tokens, temperature, top_p, seed, stop):
        body = {"model": self.model, "max_tokens": int(max_new_tokens),
                "temperature": float(temperature), "top_p": float(top_p), "seed": int(seed),
                "n": 1}
        if stop:
            body["stop"] = list(stop)
        if self.route == "chat":
            body["messages"] = _messages(prompt, system)
        else:
            if not isinstance(prompt, str):
                raise ConfigError("route 'completions' sends text as is; give text prompts, or "
                                  "use route 'chat' for conversations.")
            body["prompt"] = prompt if system is None else f"{system}\n\n{prompt}"
        return {**body, **self.extra_body}

    def cache_key(self, payload: dict) -> str:
        """SHA-256 of what can change the sample (see the module docstring)."""
        from em_interp import __version__

        doc = {"toolkit": __version__, "endpoint": self.endpoint.display_url,
               "route": self.route, "request": payload}
        blob = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path | None:
        return None if self._cache is None else self._cache / key[:2] / f"{key}.json"

    def _read(self, key: str) -> dict | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
            return {k: doc[k] for k in ("completion", "finish_reason", "n_tokens")}
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("ignoring an unreadable served-generation cache file %s", path)
            return None

    def _parse(self, doc) -> dict:
        try:
            choice = doc["choices"][0]
            text = (choice["message"]["content"] if self.route == "chat" else choice["text"])
            if not isinstance(text, str):
                raise TypeError
        except (KeyError, IndexError, TypeError):
            raise ServerError(
                f"{self.endpoint.display_url}{ROUTES[self.route]} sent a malformed reply (no "
                f"choices[0].{'message.content' if self.route == 'chat' else 'text'}): "
                f"{self.endpoint.redact(json.dumps(doc)[:200])}. Nothing was cached.") from None
        usage = doc.get("usage") if isinstance(doc, dict) else None
        n_tok = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return {"completion": text, "finish_reason": choice.get("finish_reason"),
                "n_tokens": int(n_tok) if isinstance(n_tok, int) else None}

    def _request(self, key: str, payload: dict) -> dict:
        out = self._parse(self.endpoint.post(ROUTES[self.route], payload))
        path = self._path(key)
        if path is not None:
            from em_interp.atomic import atomic_write_bytes

            atomic_write_bytes(path, json.dumps({**out, "request": payload}, ensure_ascii=False,
                                                indent=1).encode())
        return out

    # -- public
    def generate(self, prompts, *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, n_samples: int = 1, seed: int = 0,
                 system: str | None = None, stop: list[str] | None = None,
                 interventions=None, step_hook=None, progress: bool = True
                 ) -> GenerationResult:
        """Sample ``n_samples`` completions of each prompt (cached ones are not re-requested).

        Raises:
            ConfigError: interventions or a step hook (a served model cannot be hooked: use
                :func:`~em_interp.behaviour.generation.generate`), or bad sizes; before any
                request.
            ServerError: after every other request finished (and was cached), if some failed.
        """
        if interventions not in (None, (), []) or step_hook is not None:
            raise ConfigError("a served model cannot be hooked: interventions and step hooks "
                              "need the local TransformerLens path (em_interp.generate, or leave "
                              "out [<stage>.generator] in a run config).")
        if max_new_tokens < 1 or n_samples < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise ConfigError("max_new_tokens >= 1, n_samples >= 1, temperature >= 0 and "
                              "0 < top_p <= 1 please.")
        items = as_prompt_list(prompts)
        jobs, rows = [], {}
        for i, p in enumerate(items):
            for s in range(n_samples):
                payload = self._payload(p, system=system, max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_p=top_p,
                                        seed=sample_seed(seed, i, s), stop=stop)
                key = self.cache_key(payload)
                hit = self._read(key)
                if hit is None:
                    jobs.append((i, s, key, payload))
                else:
                    rows[(i, s)] = hit
        failures = []
        bar = tqdm(total=len(jobs), desc=self.name, disable=not progress or not jobs,
                   leave=False)
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = {pool.submit(self._request, key, payload): (i, s)
                       for i, s, key, payload in jobs}
            for fut in as_completed(futures):
                try:
                    rows[futures[fut]] = fut.result()
                except ServerError as e:
                    failures.append((futures[fut], e))
                bar.update(1)
        bar.close()
        if failures:
            failures.sort(key=lambda f: f[0])
            (i, s), err = failures[0]
            raise ServerError(f"{self.name}: {len(failures)} of {len(jobs)} requests failed "
                              f"(first: prompt {i}, sample {s}: {err}). The "
                              f"{len(jobs) - len(failures)} that succeeded are cached; rerun to "
                              "retry the rest.")
        table = pd.DataFrame([
            {"prompt_index": i, "prompt": _display(items[i]), "sample": s,
             "completion": r["completion"],
             "n_tokens": math.nan if r["n_tokens"] is None else r["n_tokens"],
             "stop_reason": FINISH.get(r["finish_reason"], r["finish_reason"]), "tokens": []}
            for (i, s), r in sorted(rows.items())])
        identical = bool(n_samples > 1 and temperature > 0 and len(table) and (
            table.groupby("prompt_index")["completion"].nunique() == 1).all())
        if identical:
            log.warning("%s returned the same completion for every sample of every prompt at "
                        "temperature %g: the server seems to ignore temperature or seed, so the "
                        "samples are not independent draws.", self.name, temperature)
        settings = {"identical_samples": identical, "backend": "served",
                    "base_url": self.endpoint.display_url,
                    "route": self.route, "served_model": self.model,
                    "max_new_tokens": max_new_tokens, "temperature": temperature,
                    "top_p": top_p, "n_samples": n_samples, "seed": seed, "system": system,
                    "stop": stop, "extra_body": self.extra_body}
        return GenerationResult(table=table, settings=settings)
