"""`em-interp sweep`: the sweep file's checks, the expansion of its axes, the local backend end to
end on the tiny card (resume, a failing point retried and kept), the across-seed intervals
against direct computations, and one real local-Ray run."""

import itertools
import json
import re
import sys

import numpy as np
import pytest

from em_interp.cli import main
from em_interp.errors import ConfigError
from em_interp.run.sweep import SweepSpec, across_seed_interval, run_point, run_sweep, summarize
from em_interp.run.sweep.spec import list_sweeps
from em_interp.run.sweep.summary import headline
from em_interp.stats import cluster_bootstrap_ci

TINY_BASE = """\
[run]
card = "tiny-random-llama"
stages = ["probing"]
batch_size = 8
max_prompt_chars = 150

[probing]
n_prompts = 32
layers = [1, 2]
"""


def _write(tmp_path, axes: str, extra: str = "", head: str = "") -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tiny.toml").write_text(TINY_BASE)
    path = tmp_path / "sweep.toml"
    path.write_text(f'[sweep]\nbase = "tiny.toml"\n{head}\n{extra}\n[axes]\n{axes}\n')
    return str(path)


# ---------------------------------------------------------------- parsing and validation


@pytest.mark.parametrize("axes, head, message", [
    ('"block_em.lambda" = [[0.0, 1.0]]', "", "did you mean 'block_em.lambdas'"),
    ('"probing.nope" = [1]', "", "names no config field"),
    ('"blockem.lambdas" = [1]', "", "names no config field"),
    ('"probing" = [1]', "", "is a table"),
    ("seed = []", "", "non-empty list"),
    ("seed = 3", "", "non-empty list"),
    ("seed = [0]", "retries = -1", "retries"),
    ('seed = [0]\n"run.seed" = [1]', "", "names 'seed' twice"),
    ("seed = [0]", "colour = 1", "unknown key(s) ['colour'] in [sweep]"),
    ("seed = [0]", 'seed_keys = ["block_em.seed"]', "did you mean 'block_em.seeds'"),
])
def test_bad_sweep_files_fail_when_read(tmp_path, axes, head, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        SweepSpec.from_toml(_write(tmp_path, axes, head=head))


def test_bad_tables_base_and_resources(tmp_path):
    with pytest.raises(ConfigError, match="unknown table"):
        SweepSpec.from_dict({"sweep": {"base": "quick"}, "axis": {}})
    with pytest.raises(ConfigError, match="must name the base run config"):
        SweepSpec.from_dict({"axes": {"seed": [0]}})
    with pytest.raises(ConfigError, match="neither a file nor a shipped example"):
        SweepSpec.from_dict({"sweep": {"base": "no-such-config"}}).points()
    with pytest.raises(ConfigError, match=r"\[resources\].memory: memory size '4 parsecs'"):
        SweepSpec.from_dict({"sweep": {"base": "quick"}, "resources": {"memory": "4 parsecs"}})
    with pytest.raises(ConfigError, match=r"\[resources\].num_gpus"):
        SweepSpec.from_dict({"sweep": {"base": "quick"}, "resources": {"num_gpus": -1}})
    spec = SweepSpec.from_dict({"sweep": {"base": "quick"}, "resources": {"memory": "4GiB"}})
    assert spec.resources.memory == 4 * 2**30


def test_a_bad_value_names_its_point_and_key_before_anything_runs(tmp_path):
    spec = SweepSpec.from_toml(_write(tmp_path, 'seed = [0, 1]\n"probing.layers" = [[1], [7]]'))
    with pytest.raises(ConfigError) as e:
        run_sweep(spec, tmp_path / "out", runner=_never)
    msg = str(e.value)
    assert "point 1 (seed=0, probing.layers=[7])" in msg and "[probing].layers" in msg
    assert "3 layers" in msg and not (tmp_path / "out").exists()
    spec = SweepSpec.from_toml(_write(tmp_path, '"probing.hook" = ["mlp_post", "mlp_pst"]'))
    with pytest.raises(ConfigError, match=r"point 1 \(probing.hook=mlp_pst\).*\[probing\].hook"):
        spec.points()
    spec = SweepSpec.from_toml(_write(tmp_path, 'card = ["tiny-random-llama", "no-such-card"]'))
    with pytest.raises(ConfigError, match=r"point 1 \(card=no-such-card\).*unknown card"):
        spec.points()
    spec = SweepSpec.from_toml(_write(tmp_path, "seed = [0, 0]"))
    with pytest.raises(ConfigError, match="same config as point 0"):
        spec.points()


def test_a_point_whose_memory_plan_does_not_fit_is_refused_before_anything_runs(
        tmp_path, monkeypatch):
    import em_interp.run.plan as plan

    spec = SweepSpec.from_toml(_write(tmp_path, "seed = [0, 1]"))
    monkeypatch.setattr(plan, "available_ram", lambda: 1000)  # a machine with 1 kB free
    with pytest.raises(ConfigError, match=r"point 0 \(seed=0\).*memory plan.*does not fit"):
        run_sweep(spec, tmp_path / "out", runner=_never)
    # on Ray, a CPU point is checked against the memory it declares
    small = SweepSpec.from_toml(_write(tmp_path / "ray", "seed = [0]",
                                       extra='[resources]\nmemory = "1KiB"'))
    with pytest.raises(ConfigError, match=r"point 0 \(seed=0\).*declares to Ray"):
        run_sweep(small, tmp_path / "ray" / "out", backend="ray", runner=_never)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ray" / "out").exists()


def _never(payload):
    raise AssertionError("no point may run when a point is invalid")


# ---------------------------------------------------------------- expansion


def test_axes_expand_into_the_product_in_file_order(tmp_path):
    spec = SweepSpec.from_toml(_write(
        tmp_path, 'seed = [0, 1, 2]\n"probing.hook" = ["mlp_post", "resid_post"]',
        extra='[set]\n"probing.n_prompts" = 40\n"block_em.max_steps" = 1',
        head='seed_keys = ["block_em.seeds"]'))
    pts = spec.points()
    want = list(itertools.product([0, 1, 2], ["mlp_post", "resid_post"]))
    assert [(p.axes["seed"], p.axes["probing.hook"]) for p in pts] == want
    assert [p.index for p in pts] == list(range(6))
    for p, (seed, hook) in zip(pts, want, strict=True):
        assert p.config.seed == seed and p.config.probing.hook == hook
        assert p.config.block_em.seeds == [seed]  # follows the seed axis (a list key)
        assert p.config.probing.n_prompts == 40 and p.config.block_em.max_steps == 1
        assert p.config.card == "tiny-random-llama" and p.config.probing.layers == [1, 2]
    assert len({p.key for p in pts}) == 6
    # "run.seed" is the seed axis under its long name
    long = SweepSpec.from_toml(_write(tmp_path, '"run.seed" = [0, 1]'))
    assert list(long.axes) == ["seed"] and [p.seed for p in long.points()] == [0, 1]
    # the same grid written in another order has the same point folders
    other = SweepSpec.from_toml(_write(
        tmp_path, '"probing.hook" = ["resid_post", "mlp_post"]\nseed = [2, 1, 0]',
        extra='[set]\n"block_em.max_steps" = 1\n"probing.n_prompts" = 40',
        head='seed_keys = ["block_em.seeds"]'))
    assert {p.key for p in other.points()} == {p.key for p in pts}


def test_checkpoints_are_a_card_axis(tmp_path):
    from em_interp.models.cards import get_card

    text = get_card("tiny-random-llama").path.read_text()
    for step in (10, 20):  # one card per checkpoint (here: the tiny card under another name)
        (tmp_path / f"checkpoint-{step}.toml").write_text(
            text.replace('name = "tiny-random-llama"', f'name = "checkpoint-{step}"'))
    spec = SweepSpec.from_toml(_write(
        tmp_path, "seed = [0]", head='checkpoints = ["checkpoint-10.toml", "checkpoint-20.toml"]'))
    pts = spec.points()
    assert [p.config.card for p in pts] == [str(tmp_path / f"checkpoint-{s}.toml")
                                           for s in (10, 20)]
    assert pts[0].label == "seed=0, checkpoint=checkpoint-10"


def test_shipped_sweeps_parse_and_validate():
    assert set(list_sweeps()) >= {"quick-cpu", "demo-lambda", "qwen-paper-domains"}
    qwen = SweepSpec.from_toml("qwen-paper-domains").points()
    assert len(qwen) == 9 and {p.config.card for p in qwen} == {
        f"qwen2.5-32b-instruct-{d}" for d in ("risky-financial-advice", "bad-medical-advice",
                                              "extreme-sports")}
    assert {p.config.seed for p in qwen} == {0, 1, 2} and qwen[0].config.n_devices == 2
    demo = SweepSpec.from_toml("demo-lambda").points()
    assert [p.config.block_em.seeds for p in demo] == [[0], [1], [2]]
    assert demo[0].config.block_em.lambdas == [0.0, 100.0, 1000.0, 10000.0]
    assert len(SweepSpec.from_toml("quick-cpu").points()) == 6


# ---------------------------------------------------------------- intervals


def test_across_seed_interval_matches_the_exact_bootstrap_distribution():
    # Seed 0 has two observations (1, 1), seed 1 one (4). Resampling two seeds: (0,0) -> mean 1
    # (p 1/4), (1,1) -> 4 (p 1/4), one of each -> (1+1+4)/3 = 2 (p 1/2). The 95% percentile
    # interval is therefore [1, 4]; the estimate is the pooled mean 2 (not the mean of seed
    # means, 2.5).
    ci = across_seed_interval([1.0, 1.0, 4.0], [0, 0, 1], n_boot=4000)
    assert ci.estimate == pytest.approx(2.0) and ci.low == 1.0 and ci.high == 4.0
    assert ci.n_clusters == 2
    # One value per seed: the ordinary bootstrap of the mean, whose variance is sigma^2 / n
    # with sigma^2 the population variance of the observed values.
    x = np.array([0.2, 0.5, 0.9, 1.4])
    ci = across_seed_interval(x, [10, 11, 12, 13], n_boot=40000)
    assert ci.se == pytest.approx(np.sqrt(x.var() / len(x)), rel=0.03)
    assert across_seed_interval([1.0, 2.0], [0, 0]) is None  # one seed: no interval


def test_summarize_pools_points_per_axis_value_with_seeds_as_clusters():
    recs = []
    rng = np.random.default_rng(0)
    for seed, hook in itertools.product([0, 1, 2], ["a", "b"]):
        recs.append({"status": "finished", "seed": seed, "axes": {"seed": seed, "hook": hook},
                     "headline": {"m": float(rng.normal())},
                     "block_em": [{"lam": lam, "seed": seed, "reduction": float(rng.normal()),
                                   "incoherence": float(rng.random())}
                                  for lam in (0.0, 10.0, 100.0)]})
    recs.append({"status": "failed", "seed": 3, "axes": {"seed": 3, "hook": "a"},
                 "headline": {}, "block_em": []})
    s = summarize(recs, ["seed", "hook"], ("m",), n_boot=500)
    iv = s.intervals.set_index(["metric", "axis", "x_label"])
    for hook in ("a", "b"):
        vals = [r["headline"]["m"] for r in recs if r["axes"]["hook"] == hook and r["headline"]]
        direct = cluster_bootstrap_ci(vals, [0, 1, 2], n_boot=500, seed=0)
        row = iv.loc[("m", "hook", hook)]
        assert row["n_seeds"] == 3 and row["estimate"] == pytest.approx(np.mean(vals))
        assert (row["low"], row["high"]) == pytest.approx((direct.low, direct.high))
    # BLOCK-EM against lambda: one curve per value of the other non-seed axis (hook)
    lam_iv = s.intervals.set_index(["metric", "curve", "x_label"])
    for lam, hook in itertools.product((10.0, 100.0), ("a", "b")):
        vals = [b["reduction"] for r in recs if r["axes"]["hook"] == hook
                for b in r["block_em"] if b["lam"] == lam]
        direct = cluster_bootstrap_ci(vals, ["0/0", "1/1", "2/2"], n_boot=500, seed=0)
        row = lam_iv.loc[("block_em.reduction", f"hook={hook}", f"{lam:g}")]
        assert row["n"] == 3 and (row["low"], row["high"]) == pytest.approx(
            (direct.low, direct.high))
    assert ("block_em.reduction", "lambda", "0") not in iv.index  # no reduction at lambda 0
    assert ("block_em.incoherence", "lambda", "0") in iv.index
    assert s.figure("m", "hook").data and s.to_dict()["intervals"]
    fig = s.figure("block_em.reduction", "lambda")  # lambdas in numeric order, as categories
    assert tuple(fig.layout.xaxis.categoryarray) == ("10", "100")
    assert [len(tr.x) for tr in fig.data] == [6, 2, 6, 2]  # per seed and mean, per hook


def test_headline_flattens_numbers_and_skips_prompt_ids():
    res = {"probing": {"best_accuracy": 0.75, "chosen": True, "name": "x", "per_layer": [1, 2],
                       "control": {"accuracy": 0.5, "deep": {"deeper": {"x": 1}}},
                       "prompts": {"n_fit": 3}, "nan": float("nan")}}
    assert headline(res) == {"probing.best_accuracy": 0.75, "probing.chosen": 1.0,
                             "probing.control.accuracy": 0.5}


# ---------------------------------------------------------------- local backend end to end


def test_run_point_reports_a_failing_run_instead_of_raising(tmp_path):
    from em_interp.run.config import RunConfig

    (tmp_path / "tiny.toml").write_text(TINY_BASE)
    cfg = RunConfig.from_toml(tmp_path / "tiny.toml")
    (tmp_path / "a-file").write_text("")
    res = run_point({"config": cfg.to_dict(), "source": "x", "run_dir": str(tmp_path / "a-file")})
    assert res["status"] == "failed" and res["error"].startswith("ConfigError:")
    assert "is a file, not a folder" in res["error"] and "Traceback" in res["traceback"]


class Counting:
    """A point runner that counts its calls and fails the points it is told to."""

    def __init__(self, fail_labels=(), times=99):
        self.calls, self.fail_labels, self.times, self.failures = [], set(fail_labels), times, 0
        self.seen = []  # sweep.json's counts as each call starts

    def __call__(self, payload):
        from pathlib import Path

        doc = Path(payload["run_dir"]).parents[1] / "sweep.json"
        self.seen.append(json.loads(doc.read_text())["counts"] if doc.is_file() else None)
        cfg = payload["config"]
        label = (cfg["run"]["seed"], cfg["probing"]["hook"])
        self.calls.append(label)
        if label in self.fail_labels and self.failures < self.times:
            self.failures += 1
            raise RuntimeError(f"planted failure of {label}")
        return run_point(payload)


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    path = _write(root, 'seed = [0, 1]\n"probing.hook" = ["mlp_post", "resid_post"]',
                  head='metrics = ["probing.best_accuracy", "probing.cv_accuracy", "probing.nope"]')
    spec = SweepSpec.from_toml(path)
    runner = Counting(fail_labels={(1, "resid_post")})
    outcome = run_sweep(spec, root / "out", retries=1, runner=runner)
    return spec, path, root / "out", outcome, runner


def test_local_sweep_runs_each_point_and_keeps_the_failed_one(local_sweep):
    spec, _, out, outcome, runner = local_sweep
    doc = json.loads(outcome.sweep_json.read_text())
    assert len(doc["points"]) == 4 and doc["counts"] == {"finished": 3, "cached": 0,
                                                         "failed": 1, "pending": 0}
    # the failing point was tried 1 + retries times, the others once
    assert runner.calls.count((1, "resid_post")) == 2 and len(runner.calls) == 5
    # sweep.json is rewritten after every point: the third point saw two finished, two pending;
    # the retry saw three finished and the failed one
    assert runner.seen[:1] == [None]
    assert runner.seen[2] == {"finished": 2, "cached": 0, "failed": 0, "pending": 2}
    assert runner.seen[4] == {"finished": 3, "cached": 0, "failed": 1, "pending": 0}
    bad = [p for p in doc["points"] if p["status"] == "failed"]
    assert len(bad) == 1 and bad[0]["attempts"] == 2 and bad[0]["axes"] == {
        "seed": 1, "probing.hook": "resid_post"}
    assert "planted failure" in bad[0]["error"] and bad[0]["headline"] == {}
    for p in doc["points"]:
        if p["status"] == "finished":
            assert p["attempts"] == 1
            saved = json.loads((out / p["run_dir"] / "results.json").read_text())
            assert p["headline"]["probing.best_accuracy"] == saved["probing"]["best_accuracy"]
            assert (out / p["run_dir"] / "point.json").is_file()
    html = outcome.sweep_html.read_text()
    assert "<script src=" not in html and "planted failure" in html and "sweep-fig0" in html
    assert doc["missing_metrics"] == ["probing.nope"] and "probing.nope" in html
    assert {r["metric"] for r in doc["intervals"]} == {"probing.best_accuracy",
                                                       "probing.cv_accuracy"}
    # the interval at resid_post has one seed left (the other failed): no interval
    iv = {(r["metric"], r["x_label"]): r for r in doc["intervals"]}
    assert iv[("probing.best_accuracy", "resid_post")]["n_seeds"] == 1
    assert iv[("probing.best_accuracy", "resid_post")]["low"] is None
    row = iv[("probing.best_accuracy", "mlp_post")]
    vals = [p["headline"]["probing.best_accuracy"] for p in doc["points"]
            if p["axes"]["probing.hook"] == "mlp_post"]
    direct = cluster_bootstrap_ci(vals, [0, 1], seed=0)
    assert row["n_seeds"] == 2 and (row["low"], row["high"]) == pytest.approx(
        (direct.low, direct.high))


def test_rerun_recomputes_only_the_failed_point_then_nothing(local_sweep):
    spec, _, out, first, _ = local_sweep
    runner = Counting()
    again = run_sweep(spec, out, runner=runner)
    assert runner.calls == [(1, "resid_post")]
    assert [p["status"] for p in again.points] == ["cached", "cached", "cached", "finished"]
    before = {p["key"]: p["headline"] for p in first.points if p["status"] == "finished"}
    assert all(p["headline"] == before[p["key"]] for p in again.points if p["key"] in before)
    runner = Counting()
    third = run_sweep(spec, out, runner=runner)
    assert runner.calls == [] and {p["status"] for p in third.points} == {"cached"}


def test_cli_sweep_lists_resumes_and_names_the_ray_extra(local_sweep, capsys, monkeypatch):
    _, path, out, _, _ = local_sweep
    assert main(["sweep", "--list"]) == 0 and "quick-cpu" in capsys.readouterr().out
    assert main(["sweep", path, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0 run now, 4 finished earlier, 0 failed" in text
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    assert main(["sweep", path, "--out", str(out), "--backend", "ray"]) == 2
    assert "pip install 'em-interp[sweep]'" in capsys.readouterr().err
    assert main(["sweep", path, "--out", str(out), "--address", "auto"]) == 2
    assert "--backend ray" in capsys.readouterr().err


# ---------------------------------------------------------------- one real local-Ray run


def test_ray_backend_runs_points_as_ray_tasks(tmp_path, local_sweep):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install "
                                            "'em-interp[sweep]'); the Ray backend is untested")
    spec = SweepSpec.from_toml(_write(tmp_path, "seed = [0, 1]",
                                      extra='[resources]\nnum_cpus = 1\nmemory = "1GiB"'))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    try:
        greedy = SweepSpec.from_toml(_write(tmp_path / "greedy", "seed = [0]",
                                            extra="[resources]\nnum_gpus = 64"))
        with pytest.raises(ConfigError, match=r"num_gpus 64 \(the instance has 0\)"):
            run_sweep(greedy, tmp_path / "greedy" / "out", backend="ray")
        outcome = run_sweep(spec, tmp_path / "out", backend="ray")
    finally:
        ray.shutdown()
    doc = json.loads(outcome.sweep_json.read_text())
    assert doc["backend"] == "ray" and doc["counts"]["finished"] == 2, doc["points"]
    # the same configs as the local sweep's mlp_post points (the default hook): the same point
    # folders' names and the same numbers, whichever backend ran them
    local = {p["key"]: p for p in local_sweep[3].points if p["axes"]["probing.hook"] == "mlp_post"}
    assert [p["key"] for p in doc["points"]] == list(local)
    assert all(p["headline"] == local[p["key"]]["headline"] and p["headline"]
               for p in doc["points"])
