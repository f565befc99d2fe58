"""Served generation against a loopback OpenAI-compatible fake: concurrency, retries, the cache,
malformed replies, and the refusal to hook a served model."""

from __future__ import annotations

import json

import pytest
from fake_openai import FakeOpenAI

from em_interp.behaviour.generation import GenerationResult
from em_interp.behaviour.openai_http import OpenAIEndpoint
from em_interp.behaviour.served import ServedGenerator, sample_seed
from em_interp.errors import ConfigError, ServerError


def _gen(fake, tmp_path, **kw):
    kw = {"cache_dir": tmp_path / "cache", "backoff": 0.0, **kw}
    return ServedGenerator(fake.base_url, kw.pop("model", "organism"), **kw)


def test_samples_run_concurrently_and_come_back_as_a_generation_result(tmp_path):
    with FakeOpenAI(delay=0.2) as fake:
        gen = _gen(fake, tmp_path, max_concurrency=4)
        res = gen.generate(["Q one?", "Q two?"], max_new_tokens=16, n_samples=3, seed=7,
                           temperature=1.0, top_p=0.9, progress=False)
    assert isinstance(res, GenerationResult)
    assert fake.max_in_flight > 1  # the server saw overlapping requests
    df = res.df
    assert list(zip(df["prompt_index"], df["sample"], strict=True)) == [
        (i, s) for i in range(2) for s in range(3)]
    # every request carried the sampling parameters and its own (prompt, sample) seed
    bodies = [r["body"] for r in fake.posts()]
    assert len(bodies) == 6
    assert {b["seed"] for b in bodies} == {sample_seed(7, i, s) for i in range(2)
                                           for s in range(3)}
    assert all(b["temperature"] == 1.0 and b["top_p"] == 0.9 and b["max_tokens"] == 16
               for b in bodies)
    for row in df.itertuples():
        assert row.completion.startswith(f"[organism seed {sample_seed(7, row.prompt_index, row.sample)}]")
        assert row.stop_reason == "eos" and row.tokens == []
    assert res.settings["backend"] == "served" and res.settings["served_model"] == "organism"


def test_retries_after_429_and_5xx(tmp_path):
    with FakeOpenAI() as fake:
        fake.fail(429, 2)
        fake.fail(503, 1)
        res = _gen(fake, tmp_path, max_concurrency=1, max_retries=3).generate(
            ["Q?"], max_new_tokens=8, progress=False)
    assert len(fake.posts()) == 4 and res.df["completion"].iloc[0].startswith("[organism")


def test_gives_up_with_a_clear_error_after_the_last_retry(tmp_path):
    with FakeOpenAI() as fake:
        fake.fail(500, 10)
        with pytest.raises(ServerError, match=r"failed after 3 attempts \(last: HTTP 500"):
            _gen(fake, tmp_path, max_retries=2).generate(["Q?"], max_new_tokens=8,
                                                         progress=False)
        assert not list((tmp_path / "cache").rglob("*.json"))


def test_a_client_error_is_not_retried_and_names_the_url(tmp_path):
    with FakeOpenAI() as fake:
        fake.fail(404, 1)
        with pytest.raises(ServerError, match=r"127\.0\.0\.1.*HTTP 404"):
            _gen(fake, tmp_path).generate(["Q?"], max_new_tokens=8, progress=False)
        assert len(fake.posts()) == 1


def test_cache_answers_repeats_and_is_keyed_on_what_changes_the_sample(tmp_path):
    with FakeOpenAI() as fake:
        gen = _gen(fake, tmp_path)
        first = gen.generate(["Q?", "R?"], max_new_tokens=8, n_samples=2, progress=False)
        assert len(fake.posts()) == 4
        again = gen.generate(["Q?", "R?"], max_new_tokens=8, n_samples=2, progress=False)
        assert len(fake.posts()) == 4  # nothing re-requested
        assert again.df["completion"].tolist() == first.df["completion"].tolist()
        for change in ({"temperature": 0.5}, {"seed": 1}, {"max_new_tokens": 9}):
            n = len(fake.posts())
            gen.generate(["Q?"], **{"max_new_tokens": 8, **change}, progress=False)
            assert len(fake.posts()) == n + 1, change
        n = len(fake.posts())
        _gen(fake, tmp_path, model="other").generate(["Q?"], max_new_tokens=8, progress=False)
        assert len(fake.posts()) == n + 1
        # concurrency and retry settings change when, not what: still cached
        _gen(fake, tmp_path, max_concurrency=2, max_retries=0).generate(
            ["Q?"], max_new_tokens=8, progress=False)
        assert len(fake.posts()) == n + 1


def test_the_api_key_is_sent_but_never_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sk-secret-123")
    with FakeOpenAI() as fake:
        _gen(fake, tmp_path, api_key_env="FAKE_KEY").generate(["Q?"], max_new_tokens=8,
                                                              progress=False)
    assert fake.posts()[0]["auth"] == "Bearer sk-secret-123"
    for f in (tmp_path / "cache").rglob("*.json"):
        assert "sk-secret-123" not in f.read_text()


def test_a_malformed_reply_is_an_error_and_is_not_cached(tmp_path):
    with FakeOpenAI() as fake:
        fake.malformed(1)
        gen = _gen(fake, tmp_path, max_concurrency=1)
        with pytest.raises(ServerError, match=r"1 of 2 requests failed.*malformed reply"):
            gen.generate(["Q?", "R?"], max_new_tokens=8, progress=False)
        cached = list((tmp_path / "cache").rglob("*.json"))
        assert len(cached) == 1  # only the good one
        assert "choices" not in json.loads(cached[0].read_text())["completion"]
        res = gen.generate(["Q?", "R?"], max_new_tokens=8, progress=False)  # a rerun retries
        assert len(res.df) == 2 and len(fake.posts()) == 3


def test_completions_route_and_finish_reasons(tmp_path):
    with FakeOpenAI() as fake:
        res = _gen(fake, tmp_path, route="completions").generate(
            ["Once upon"], max_new_tokens=3, progress=False)
    assert fake.posts()[0]["path"] == "/v1/completions"
    assert res.df["completion"].iloc[0] == "echo: Once upon"
    assert res.df["stop_reason"].iloc[0] == "max_new_tokens" and res.df["n_tokens"].iloc[0] == 3


def test_hooks_need_the_local_path_and_bad_settings_fail_before_any_request(tmp_path):
    with FakeOpenAI() as fake:
        gen = _gen(fake, tmp_path)
        with pytest.raises(ConfigError, match="cannot be hooked.*local TransformerLens"):
            gen.generate(["Q?"], max_new_tokens=8, interventions=[object()], progress=False)
        with pytest.raises(ConfigError, match="max_new_tokens >= 1"):
            gen.generate(["Q?"], max_new_tokens=0, progress=False)
        with pytest.raises(ConfigError, match="route"):
            _gen(fake, tmp_path, route="responses")
        assert fake.posts() == []


def test_reachability_check_names_the_url():
    with FakeOpenAI() as fake:
        OpenAIEndpoint(fake.base_url).check_reachable("[x]")
        url = fake.base_url
    with pytest.raises(ConfigError, match=r"\[em_eval.generator\]: nothing answers at "
                                          + url.replace(".", r"\.")):
        OpenAIEndpoint(url).check_reachable("[em_eval.generator]", timeout=2)
    # credentials in the URL never reach a message
    with pytest.raises(ConfigError) as e:
        OpenAIEndpoint(url.replace("http://", "http://user:pw@")).check_reachable("[j]",
                                                                                  timeout=2)
    assert "pw" not in str(e.value)


def test_a_server_that_ignores_temperature_is_flagged(tmp_path, caplog):
    with FakeOpenAI() as fake:
        gen = _gen(fake, tmp_path)
        fake.reply = lambda path, body: {"choices": [{"message": {"content": "always this"},
                                                      "finish_reason": "stop"}]}
        res = gen.generate(["Q?", "R?"], max_new_tokens=8, n_samples=3, temperature=1.0,
                           progress=False)
        assert res.settings["identical_samples"] is True
        assert "ignore temperature or seed" in caplog.text
        ok = gen.generate(["Q?"], max_new_tokens=8, n_samples=1, temperature=1.0,
                          progress=False)
    assert ok.settings["identical_samples"] is False  # one sample: nothing to compare
