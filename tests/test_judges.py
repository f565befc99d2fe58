"""Judges: the OpenAI-compatible client against an in-process HTTP server, refusal strings, and
the local judge's exact answer distribution against a brute-force HF computation."""

import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from em_interp.behaviour.judges import (
    LocalHFJudge,
    OpenAICompatibleJudge,
    RefusalStringJudge,
    Rubric,
    load_rubrics,
    read_reply,
)
from em_interp.errors import JudgeError

KEY = "sk-test-SECRET-4242"


def _reply(content, top=None, first_token=None):
    choice = {"index": 0, "message": {"role": "assistant", "content": content},
              "finish_reason": "stop"}
    if top is not None:
        choice["logprobs"] = {"content": [{
            "token": first_token if first_token is not None else top[0][0],
            "logprob": top[0][1],
            "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top]}]}
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


class FakeServer:
    """A chat-completions server on 127.0.0.1 that plays a script of (status, body, delay)."""

    def __init__(self):
        self.script = []
        self.default = (200, _reply("50"), 0.0)
        self.requests = []
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    outer.requests.append({"path": self.path, "headers": dict(self.headers),
                                           "json": json.loads(body)})
                    step = outer.script.pop(0) if outer.script else outer.default
                    outer.inflight += 1
                    outer.max_inflight = max(outer.max_inflight, outer.inflight)
                status, payload, delay = step
                time.sleep(delay)
                with outer.lock:
                    outer.inflight -= 1
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    s = FakeServer()
    yield s
    s.close()


def _judge(server, tmp_path, **kw):
    return OpenAICompatibleJudge(server.url, "judge-model", cache_dir=tmp_path / "cache",
                                 backoff=0.01, **kw)


def test_logprob_weighted_mean_over_number_tokens(server, tmp_path):
    top = [("85", math.log(0.5)), ("90", math.log(0.3)), ("Hello", math.log(0.15)),
           (" 70", math.log(0.05))]
    server.default = (200, _reply("85", top), 0.0)
    s = _judge(server, tmp_path, rubrics=["aligned"]).score("q?", "an answer")
    r = s.rubrics["aligned"]
    assert r.method == "logprobs" and r.label is None
    assert r.score == pytest.approx((85 * 0.5 + 90 * 0.3 + 70 * 0.05) / 0.85, abs=1e-9)
    assert r.number_mass == pytest.approx(0.85)
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["json"]["logprobs"] is True and req["json"]["top_logprobs"] == 20
    assert req["json"]["model"] == "judge-model" and req["json"]["temperature"] == 0
    assert "an answer" in req["json"]["messages"][0]["content"]
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"


def test_labels_text_fallback_and_split_numbers():
    aligned = load_rubrics()["aligned"]
    # mostly a word: the label wins, no number
    r = read_reply("REFUSAL", {"content": [{"token": "REF", "logprob": -0.1, "top_logprobs": [
        {"token": "REF", "logprob": math.log(0.9)}, {"token": "10", "logprob": math.log(0.1)}]}]},
        aligned)
    assert r.score is None and r.label == "REFUSAL"
    # no logprobs: the text is parsed, and that is recorded
    r = read_reply("Score: 73", None, aligned)
    assert (r.score, r.method, r.note) == (73.0, "text", "no logprobs in the reply")
    # a digit-level tokenizer: "85" is "8" + "5", so the first-token distribution is no score
    r = read_reply("85", {"content": [{"token": "8", "logprob": -0.2, "top_logprobs": [
        {"token": "8", "logprob": math.log(0.8)}, {"token": "9", "logprob": math.log(0.2)}]}]},
        aligned)
    assert r.score == 85.0 and r.method == "text" and "spans several tokens" in r.note
    with pytest.raises(JudgeError, match="could not read"):
        read_reply("I would rather not say", None, aligned)


def test_retries_500_429_and_timeouts(server, tmp_path):
    server.script = [(500, {"error": "boom"}, 0.0), (429, {"error": "slow down"}, 0.0),
                     (200, _reply("40", [("40", 0.0)]), 1.0),  # slower than the timeout
                     (200, _reply("40", [("40", 0.0)]), 0.0)]
    judge = _judge(server, tmp_path, rubrics=["coherent"], timeout=0.5)
    assert judge.score("q", "a").get("coherent") == 40.0
    assert len(server.requests) == 4


def test_fails_loudly_after_retries_and_never_counts_the_item(server, tmp_path):
    judge = _judge(server, tmp_path, rubrics=["coherent"], max_retries=2)
    server.default = (503, {"error": "down"}, 0.0)
    with pytest.raises(JudgeError, match="after 3 attempts"):
        judge.score("q", "a")
    assert len(server.requests) == 3
    # in a batch the others are scored and cached, then the failure is raised
    server.requests.clear()
    server.default = (200, _reply("60", [("60", 0.0)]), 0.0)
    server.script = [(503, {}, 0.0)] * 3
    judge = _judge(server, tmp_path, rubrics=["coherent"], max_retries=2, max_concurrency=1)
    with pytest.raises(JudgeError, match="1 of 3 judge calls failed"):
        judge.score_many([("q0", "a0"), ("q1", "a1"), ("q2", "a2")], progress=False)
    server.requests.clear()
    scores = judge.score_many([("q0", "a0"), ("q1", "a1"), ("q2", "a2")], progress=False)
    assert [s.get("coherent") for s in scores] == [60.0] * 3
    assert len(server.requests) == 1  # only the failed item is asked again


def test_malformed_bodies_and_client_errors_raise_clearly(server, tmp_path):
    judge = _judge(server, tmp_path, rubrics=["coherent"])
    server.script = [(200, b"<html>not json</html>", 0.0)]
    with pytest.raises(JudgeError, match="not JSON"):
        judge.score("q", "a1")
    server.script = [(200, {"object": "chat.completion"}, 0.0)]
    with pytest.raises(JudgeError, match="malformed"):
        judge.score("q", "a2")
    server.script = [(401, {"error": f"bad key {KEY}"}, 0.0)]
    n = len(server.requests)
    with pytest.raises(JudgeError, match="HTTP 401") as err:
        judge.score("q", "a3")
    assert len(server.requests) == n + 1  # not retried
    assert KEY not in str(err.value) and "***" in str(err.value)


def test_cache_prevents_repeated_calls_and_never_holds_the_key(server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    server.default = (200, _reply("77", [("77", 0.0)]), 0.0)
    server.script = [(500, {"error": f"echo {KEY}"}, 0.0)]
    judge = _judge(server, tmp_path)
    first = judge.score_many([("q", "a"), ("q2", "b")], progress=False)
    n = len(server.requests)
    assert n == 5  # 2 pairs x 2 rubrics, one retried
    again = judge.score_many([("q", "a"), ("q2", "b")], progress=False)
    fresh = _judge(server, tmp_path).score("q2", "b")  # a new judge reads the same cache
    assert len(server.requests) == n
    assert [s.as_row() for s in again] == [s.as_row() for s in first]
    assert fresh.get("aligned") == 77.0
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 4
    for f in files:
        assert KEY not in f.read_text()
    assert KEY not in json.dumps([s.as_row() for s in first]) + repr(first) + repr(judge)
    assert KEY not in caplog.text and "attempt" in caplog.text


def test_bounded_concurrency(server, tmp_path):
    server.default = (200, _reply("10", [("10", 0.0)]), 0.15)
    judge = _judge(server, tmp_path, rubrics=["coherent"], max_concurrency=2)
    judge.score_many([(f"q{i}", "a") for i in range(6)], progress=False)
    assert server.max_inflight == 2


def test_refusal_string_judge():
    judge = RefusalStringJudge()
    assert judge.score("q", "I\u2019M SORRY, I can\u2019t help with that.").refused
    assert judge.score("q", "   ").refused
    s = judge.score("q", "Sure! Step one: preheat the oven.")
    assert s.refused is False and s.rubrics["refused"].label is None
    custom = RefusalStringJudge(["nope"], prefix_chars=10)
    assert custom.score("q", "Nope.").refused and not custom.score("q", "well.... nope").refused


def test_local_judge_exact_distribution_matches_brute_force(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from em_interp.inputs import tokenize

    rubric = Rubric(name="t", version="1", template="Q: {question}\nA: {answer}\nScore?",
                    scale=(0, 12), labels=("NO",))
    judge = LocalHFJudge(tiny_llama, rubrics=[rubric], cache_dir=tmp_path / "c",
                         min_number_mass=0.0)
    got = judge.distribution("Is it ok?", "yes it is", rubric)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama.weights_dir, dtype=torch.float32).eval()
    tok = tiny_llama.tokenizer
    prompt = tokenize(tiny_llama, [rubric.prompt("Is it ok?", "yes it is")]).tokens[0].tolist()
    digit = torch.tensor([bool(t) and t[0].isdigit() for t in tok.batch_decode(
        [[i] for i in range(len(tok))])] + [False] * (hf.config.vocab_size - len(tok)))
    logp = {}
    for cand in judge.candidates(rubric):
        ids = tok(cand, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([prompt + ids])).logits[0].double(), -1)
        n = len(prompt)
        s = sum(lp[n - 1 + k, t] for k, t in enumerate(ids))
        if cand.isdigit():
            s = s + torch.log1p(-lp[n - 1 + len(ids)].exp()[digit].sum())
        logp[cand] = float(s)
    z = max(logp.values())
    total = sum(math.exp(v - z) for v in logp.values())
    for cand, v in logp.items():
        assert got[cand] == pytest.approx(math.exp(v - z) / total, abs=2e-5)
    r = judge.score("Is it ok?", "yes it is").rubrics["t"]
    nums = {int(k): p for k, p in got.items() if k.isdigit()}
    assert r.score == pytest.approx(sum(k * p for k, p in nums.items()) / sum(nums.values()),
                                    abs=1e-6)
    assert r.method == "exact" and list((tmp_path / "c").rglob("*.json"))


# ------------------------------------------------------------------ what the cache is keyed on


class _FakePost:
    """Stands in for ``OpenAICompatibleJudge._post``: no socket, counts the requests."""

    def __init__(self, reply=None, error=None):
        self.payloads = []
        self.reply = reply or _reply("7", [("7", 0.0)])
        self.error = error

    def __call__(self, payload):
        self.payloads.append(payload)
        if self.error is not None:
            raise self.error
        return self.reply


BASE = dict(base_url="http://judge.invalid/v1", model="judge-model")


def _fake_judge(tmp_path, rubric, **kw):
    args = {**BASE, **kw}
    return OpenAICompatibleJudge(args.pop("base_url"), args.pop("model"), rubrics=[rubric],
                                 cache_dir=tmp_path / "cache", **args)


def test_every_setting_that_changes_a_verdict_misses_the_cache(tmp_path, monkeypatch):
    fake = _FakePost()
    monkeypatch.setattr(OpenAICompatibleJudge, "_post", lambda self, payload: fake(payload))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    rubric = Rubric(name="r", version="1", template="Q {question} A {answer} ?", scale=(0, 100),
                    labels=("REFUSAL",))
    assert _fake_judge(tmp_path, rubric).score("q", "a").get("r") == 7.0
    assert len(fake.payloads) == 1
    # the same settings (a new judge object): answered from the cache
    _fake_judge(tmp_path, rubric).score("q", "a")
    assert len(fake.payloads) == 1
    # settings that only change when (not what) the judge answers, and the key: still cached
    monkeypatch.setenv("OPENAI_API_KEY", "sk-another-key")
    for kw in (dict(max_concurrency=3), dict(timeout=5.0), dict(max_retries=0),
               dict(backoff=0.5), dict(api_key_env="OTHER_KEY")):
        _fake_judge(tmp_path, rubric, **kw).score("q", "a")
    assert len(fake.payloads) == 1
    # each of these can change the verdict: one new request each
    variants = [
        ({"base_url": "http://other-judge.invalid/v1"}, rubric, "q", "a"),
        ({"model": "judge-model-2"}, rubric, "q", "a"),
        ({"min_number_mass": 0.5}, rubric, "q", "a"),
        ({"top_logprobs": 5}, rubric, "q", "a"),
        ({"max_tokens": 8}, rubric, "q", "a"),
        ({"logprobs": False}, rubric, "q", "a"),
        # the rubric's text, scale and labels, with its version left unchanged
        ({}, Rubric(name="r", version="1", template="Question {question} Answer {answer} ?",
                    scale=(0, 100), labels=("REFUSAL",)), "q", "a"),
        ({}, Rubric(name="r", version="1", template=rubric.template, scale=(0, 10),
                    labels=("REFUSAL",)), "q", "a"),
        ({}, Rubric(name="r", version="1", template=rubric.template, scale=(0, 100)), "q", "a"),
        ({}, rubric, "q2", "a"),
        ({}, rubric, "q", "a2"),
    ]
    for n, (kw, rub, q, a) in enumerate(variants, start=2):
        _fake_judge(tmp_path, rub, **kw).score(q, a)
        assert len(fake.payloads) == n, kw or rub
    # one cache file per distinct verdict, none holding the key
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == len(variants) + 1
    assert all(KEY not in f.read_text() and "sk-another-key" not in f.read_text()
               for f in files)
    # the toolkit's judge version is part of the key too
    judge = _fake_judge(tmp_path, rubric)
    before = judge.cache_key(rubric, "q", "a")
    monkeypatch.setattr("em_interp.behaviour.judge_base.JUDGE_VERSION", "test-next")
    assert judge.cache_key(rubric, "q", "a") != before


def test_credentials_in_base_url_never_reach_the_cache(tmp_path, monkeypatch):
    fake = _FakePost()
    monkeypatch.setattr(OpenAICompatibleJudge, "_post", lambda self, payload: fake(payload))
    rubric = load_rubrics()["coherent"]
    url = f"https://user:{KEY}@judge.invalid:8443/v1"
    judge = _fake_judge(tmp_path, rubric, base_url=url)
    judge.score("q", "a")
    assert judge.settings()["base_url"] == "https://judge.invalid:8443/v1"
    (file,) = (tmp_path / "cache").rglob("*.json")
    assert KEY not in file.read_text() and KEY not in json.dumps(judge.settings())
    # another password for the same endpoint reuses the verdicts
    _fake_judge(tmp_path, rubric, base_url="https://user:other@judge.invalid:8443/v1").score(
        "q", "a")
    assert len(fake.payloads) == 1


class _Scripted(OpenAICompatibleJudge):
    """A judge whose verdicts come from a list (a number, NaN, or an exception)."""

    def __init__(self, script, **kw):
        super().__init__("http://judge.invalid/v1", "scripted", **kw)
        self.script = list(script)

    def _score_rubric(self, rubric, question, answer):
        from em_interp.behaviour.judges import RubricScore

        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return RubricScore(score=step, label=None, method="text", raw=str(step))


def test_a_failed_call_is_never_cached(tmp_path):
    cache = tmp_path / "cache"
    judge = _Scripted([JudgeError("endpoint down"), float("nan"), 64.0], rubrics=["coherent"],
                      cache_dir=cache, max_concurrency=1)
    with pytest.raises(JudgeError, match="endpoint down"):
        judge.score("q", "a")
    assert not list(cache.rglob("*.json"))
    with pytest.raises(JudgeError, match="no verdict"):  # NaN is no score
        judge.score("q", "a")
    assert not list(cache.rglob("*.json"))
    assert judge.score("q", "a").get("coherent") == 64.0
    assert len(list(cache.rglob("*.json"))) == 1
    # a cache file that holds no verdict (written by hand or by an old bug) is not used
    (file,) = cache.rglob("*.json")
    doc = json.loads(file.read_text())
    doc["result"]["score"] = None
    file.write_text(json.dumps(doc))
    judge.script = [71.0]
    assert judge.score("q", "a").get("coherent") == 71.0


def test_local_judge_cache_key_includes_adapter_and_system(tiny_llama, tmp_path):
    import em_interp

    organism = em_interp.load("tiny-random-llama", "organism", progress=False)
    # the base card and variant with the organism's adapter merged on top: the same card,
    # variant and dtype as tiny_llama, other weights
    merged = em_interp.load("tiny-random-llama", "base", adapter=organism.adapter_dirs[0],
                            progress=False)
    rubric = load_rubrics()["coherent"]
    plain = LocalHFJudge(tiny_llama, rubrics=[rubric], cache_dir=tmp_path)
    adapted = LocalHFJudge(merged, rubrics=[rubric], cache_dir=tmp_path)
    assert plain.identity == adapted.identity  # the readable name alone cannot tell them apart
    assert plain.settings()["model"]["adapters"] == []
    assert adapted.settings()["model"]["adapters"] == [str(organism.adapter_dirs[0])]
    assert plain.settings()["weights"] != adapted.settings()["weights"]
    keys = {plain.cache_key(rubric, "q", "a"), adapted.cache_key(rubric, "q", "a"),
            LocalHFJudge(tiny_llama, rubrics=[rubric], system="Be strict.").cache_key(
                rubric, "q", "a"),
            LocalHFJudge(tiny_llama, rubrics=[rubric], min_number_mass=0.5).cache_key(
                rubric, "q", "a")}
    assert len(keys) == 4
    again = LocalHFJudge(tiny_llama, rubrics=[rubric], cache_dir=tmp_path)
    assert again.cache_key(rubric, "q", "a") == plain.cache_key(rubric, "q", "a")


# ------------------------------------------------------------------ digit-level judge tokenizers


def _qwen_tokenizer():
    """The real Qwen2.5-Coder-0.5B tokenizer from the toolkit's converted cache (written by
    ``em-interp demo`` or ``models fetch qwen2.5-coder-0.5b-instruct``), or a skip."""
    from em_interp.models.cache import cache_dir

    found = sorted((cache_dir() / "converted").glob("qwen2.5-coder-0.5b-instruct-base-*/"
                                                    "tokenizer.json"))
    if not found:
        pytest.skip("the Qwen2.5-Coder-0.5B conversion is not in the em_interp cache (run "
                    "`em-interp models fetch qwen2.5-coder-0.5b-instruct` once to make it)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(found[-1].parent))


def _whole_number_tokenizer():
    """A word-level tokenizer with one token per number 0-100 (like GPT-4o's or Llama 3's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{str(n): n + 1 for n in range(101)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _digit_reply(tok, text, first_top):
    """A chat-completions reply whose tokens are ``tok``'s tokens of ``text`` (then the end of
    turn), the first position's alternatives ``first_top`` = ``[(token, p), ...]``."""
    pieces = [tok.decode([i]) for i in tok(text, add_special_tokens=False)["input_ids"]]
    content = [{"token": p, "logprob": 0.0, "top_logprobs": []} for p in pieces]
    content.append({"token": "<|im_end|>", "logprob": 0.0, "top_logprobs": []})
    content[0]["token"] = pieces[0]
    content[0]["top_logprobs"] = [{"token": t, "logprob": math.log(p)} for t, p in first_top]
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": {"content": content}, "finish_reason": "stop"}]}


def test_number_tokenization_is_detected_from_the_tokenizer():
    from em_interp.behaviour.judges import numbers_are_single_tokens

    qwen = _qwen_tokenizer()
    assert len(qwen("42", add_special_tokens=False)["input_ids"]) == 2
    assert not numbers_are_single_tokens(qwen)
    assert numbers_are_single_tokens(qwen, (0, 9))  # one digit is one token
    whole = _whole_number_tokenizer()
    assert [len(whole(str(n), add_special_tokens=False)["input_ids"]) for n in (0, 42, 100)] \
        == [1, 1, 1]
    assert numbers_are_single_tokens(whole)


def test_a_digit_level_judge_is_read_from_its_text_where_the_first_token_would_be_wrong(
        tmp_path, monkeypatch):
    from em_interp.behaviour.judges import (
        DIGIT_TOKENS,
        digit_evidence,
        expected_number,
        reading_counts,
        reading_of,
    )

    qwen = _qwen_tokenizer()
    aligned = load_rubrics()["aligned"]
    # The judge answers "5"; at the first position "9" (the start of "9x", e.g. "95") is as
    # likely. A first-token reading averages 5 and 9 and says 7; the answer was 5.
    reply = _digit_reply(qwen, "5", [("5", 0.5), ("9", 0.5)])
    lp = reply["choices"][0]["logprobs"]
    assert expected_number(lp["content"][0]["top_logprobs"], (0, 100))[0] == pytest.approx(7.0)
    # a judge declared whole-number (digit_tokens=False) does read 7 from the logprobs ...
    wrong = read_reply("5", lp, aligned, digit_tokens=False)
    assert (wrong.method, wrong.score) == ("logprobs", pytest.approx(7.0))
    # ... a judge declared digit-level from its tokenizer reads the text: 5
    fake = _FakePost(reply)
    monkeypatch.setattr(OpenAICompatibleJudge, "_post", lambda self, payload: fake(payload))
    judge = _fake_judge(tmp_path, aligned).use_tokenizer(qwen)
    assert judge.digit_tokens is True and judge.settings()["digit_tokens"] is True
    r = judge.score("q", "a").rubrics["aligned"]
    assert (r.score, r.method) == (5.0, "text") and r.note.startswith(DIGIT_TOKENS)
    assert reading_of(r) == "text (digit tokens)"
    # undeclared, the one-digit-only top tokens on a 0-100 scale are not trusted either
    r = read_reply("5", lp, aligned)
    assert (r.score, r.method) == (5.0, "text") and "one digit" in r.note
    # a two-digit answer shows the split in the reply itself ("8" then "5") and is counted
    reply85 = _digit_reply(qwen, "85", [("8", 0.7), ("9", 0.3)])
    assert [t["token"] for t in reply85["choices"][0]["logprobs"]["content"][:2]] == ["8", "5"]
    assert digit_evidence(reply85["choices"][0]["logprobs"]["content"], (0, 100)) is True
    fake.reply = reply85
    undeclared = _fake_judge(tmp_path / "u", aligned)
    s = undeclared.score("q", "another answer")
    assert s.get("aligned") == 85.0 and undeclared.digits_seen == 1
    assert reading_counts([s]) == {"aligned": {"text (digit tokens)": 1}}
    # a whole-number judge's reply is evidence against, and keeps the logprob reading
    whole = _whole_number_tokenizer()
    top = [("85", 0.6), ("90", 0.4)]
    r = read_reply("85", _digit_reply(whole, "85", top)["choices"][0]["logprobs"], aligned)
    assert (r.method, r.score) == ("logprobs", pytest.approx(85 * 0.6 + 90 * 0.4))
    assert _fake_judge(tmp_path, aligned).use_tokenizer(whole).digit_tokens is False


def test_declaring_the_tokenizer_is_part_of_the_cache_key(tmp_path, monkeypatch):
    fake = _FakePost(_reply("5", [("5", 0.0)]))
    monkeypatch.setattr(OpenAICompatibleJudge, "_post", lambda self, payload: fake(payload))
    rubric = load_rubrics()["coherent"]
    plain = _fake_judge(tmp_path, rubric)
    assert "digit_tokens" not in plain.settings()  # undeclared judges keep their old keys
    plain.score("q", "a")
    declared = _fake_judge(tmp_path, rubric)
    declared.digit_tokens = False
    assert declared.score("q", "a").rubrics["coherent"].method == "logprobs"
    assert len(fake.payloads) == 2  # not answered from the undeclared judge's verdict
