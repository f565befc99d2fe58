"""One client for OpenAI-compatible HTTP endpoints (vLLM, Ollama, llama.cpp server, TGI, OpenAI),
shared by the judges (:mod:`em_interp.behaviour.judges`) and served generation
(:mod:`em_interp.behaviour.served`).

A request is one ``POST <base_url><path>`` with a JSON body. It is retried after HTTP 429 and
5xx, timeouts and refused or reset connections, waiting ``Retry-After`` seconds when the server
sends it and otherwise ``min(backoff * 2**attempt, 60) * U(1, 1.25)`` (exponential, with jitter so
that concurrent workers do not retry in step). Other HTTP errors (400, 401, 404) are not retried:
they name the URL and what to check. The API key is read from the environment variable the caller
names, sent as a Bearer token, and redacted from every message; it never enters a cache key, a
result or a log line, and neither does a ``user:password@`` part of the URL.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

from em_interp.errors import ConfigError, EMInterpError

log = logging.getLogger(__name__)


def without_userinfo(url: str) -> str:
    """``url`` without ``user:password@`` (credentials never reach a cache key or file)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


class OpenAIEndpoint:
    """An OpenAI-compatible API root, e.g. ``http://127.0.0.1:8000/v1``.

    Args:
        base_url: the API root (``http://`` or ``https://``); paths are appended to it.
        api_key_env: environment variable holding the key (``None``: send none).
        max_retries: retries after the first attempt, for 429, 5xx, timeouts, connection errors.
        timeout: seconds per request.
        backoff: first retry wait in seconds (doubles each retry, with jitter, at most 60 s).
        error: the :class:`~em_interp.errors.EMInterpError` subclass raised on failure
            (``JudgeError`` for judges, ``ServerError`` for generation).
    """

    def __init__(self, base_url: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 max_retries: int = 5, timeout: float = 60.0, backoff: float = 1.0,
                 error: type[EMInterpError] = EMInterpError):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got "
                              f"{base_url!r}.")
        if max_retries < 0 or timeout <= 0 or backoff < 0:
            raise ConfigError("max_retries >= 0, timeout > 0 and backoff >= 0 please.")
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff = backoff
        self.error = error

    @property
    def display_url(self) -> str:
        """The API root without credentials: what messages, results and cache keys name."""
        return without_userinfo(self.base_url)

    def __repr__(self) -> str:  # never the key
        return f"OpenAIEndpoint({self.display_url!r})"

    def _key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def redact(self, text: str) -> str:
        """``text`` with the API key (if set) replaced by ``***``."""
        key = self._key()
        return text.replace(key, "***") if key else text

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def post(self, path: str, payload: dict) -> dict:
        """POST ``payload`` to ``base_url + path`` and return the decoded JSON reply, retrying
        what may pass (429, 5xx, timeouts, connection errors); raises ``self.error``."""
        url = self.base_url + path
        shown = self.display_url + path
        data = json.dumps(payload).encode()
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                req = urllib.request.Request(url, data=data, headers=self._headers(),
                                             method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    body = resp.read()
            except urllib.error.HTTPError as e:
                detail = self.redact(e.read()[:300].decode("utf-8", "replace"))
                if e.code == 429 or e.code >= 500:
                    last = f"HTTP {e.code}: {detail}"
                    retry_after = e.headers.get("Retry-After") if e.headers else None
                    if retry_after and retry_after.strip().replace(".", "", 1).isdigit():
                        wait = min(float(retry_after), 60.0)
                else:
                    raise self.error(
                        f"{shown} answered HTTP {e.code}: {detail}. Check base_url, the model "
                        f"name in the request and the key in ${self.api_key_env}.") from None
            except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
                last = f"{type(e).__name__}: {self.redact(str(e))}"
            except urllib.error.URLError as e:
                last = f"connection failed: {self.redact(str(e.reason))}"
            else:
                try:
                    return json.loads(body)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise self.error(
                        f"{shown} returned a body that is not JSON "
                        f"({self.redact(body[:120].decode('utf-8', 'replace'))!r}); is base_url "
                        "the API root (ending in /v1)?") from None
            log.info("request to %s failed (%s), attempt %d of %d", shown, last, attempt + 1,
                     self.max_retries + 1)
            if attempt < self.max_retries:
                time.sleep(wait if wait is not None else
                           min(self.backoff * 2 ** attempt, 60.0) * (1 + 0.25 * random.random()))
        raise self.error(f"{shown} failed after {self.max_retries + 1} attempts (last: {last}).")

    def check_reachable(self, what: str, timeout: float = 5.0) -> None:
        """Raise :class:`~em_interp.errors.ConfigError` naming the URL if nothing answers there.

        Any HTTP answer to ``GET <base_url>/models`` counts, even an error status (a server that
        needs a key still listens); a refused connection, an unknown host or a timeout does not.
        ``what`` says whose endpoint it is in the message (e.g. ``"[em_eval.judge]"``).
        """
        url = self.base_url + "/models"
        try:
            req = urllib.request.Request(url, headers=self._headers(), method="GET")
            with urllib.request.urlopen(req, timeout=timeout):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, TimeoutError, ConnectionError,
                http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(
                f"{what}: nothing answers at {self.display_url} ({self.redact(str(reason))}). "
                "Start the server (e.g. `vllm serve ...`, `ollama serve`, `llama-server ...`), "
                "or fix base_url; nothing was loaded or run.") from None
