"""BLOCK-EM's effect over seeds: the shift reduction against hand-computed t intervals and
t-tests (scipy), Holm over the lambdas, the smallest detectable effect, the coverage of the
interval on simulated seeds with a planted reduction, the paper-style table, and the config's
seeds/lambdas checks."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from em_interp.block_em.seeds import seed_interval, shift_reduction
from em_interp.errors import ConfigError, DataError
from em_interp.results import load_result
from em_interp.run.config import RunConfig
from em_interp.stats import min_detectable_effect


def runs(margins: dict[float, list[float]], domain: dict[float, list[float]] | None = None):
    rows = []
    for lam, ms in margins.items():
        for s, m in enumerate(ms):
            row = {"lam": lam, "seed": s, "margin": m, "incoherence": 0.1 * lam,
                   "heldout_nll": 2.0 + lam, "final_loss": 3.0}
            if domain is not None:
                row["domain_margin"] = domain[lam][s]
            rows.append(row)
    return rows


def t_interval(v):
    v = np.asarray(v, dtype=float)
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    return v.mean(), lo, hi


def test_reduction_is_paired_by_seed_with_a_t_interval():
    base = 0.1
    m0, m1 = [0.5, 0.6, 0.55], [0.2, 0.25, 0.3]
    d0, d1 = [1.0, 1.2, 1.1], [0.9, 1.0, 1.05]
    res = shift_reduction(runs({0.0: m0, 1.0: m1}, {0.0: d0, 1.0: d1}), base,
                          base_domain_margin=0.2, organism_margin=0.4)
    red = np.subtract(m0, m1)  # shift(0, s) - shift(1, s): the base cancels
    mean, lo, hi = t_interval(red)
    r = res.row(1.0)
    assert r["reduction"] == pytest.approx(mean)
    assert (r["reduction_low"], r["reduction_high"]) == pytest.approx((lo, hi))
    assert r["p"] == pytest.approx(stats.ttest_1samp(red, 0).pvalue)
    assert r["p_holm"] == pytest.approx(r["p"])  # one lambda > 0: Holm changes nothing
    assert bool(r["significant"]) and res.any_significant
    s_mean, s_lo, s_hi = t_interval(np.subtract(m0, base))
    z = res.row(0.0)
    assert (z["shift"], z["shift_low"], z["shift_high"]) == pytest.approx((s_mean, s_lo, s_hi))
    assert r["relative"] == pytest.approx(mean / s_mean)  # 1 - shift(1) / shift(0)
    assert r["relative_low"] == pytest.approx(lo / s_mean)
    dmean, dlo, dhi = t_interval(np.subtract(d0, d1))
    assert (r["domain_lost"], r["domain_lost_low"], r["domain_lost_high"]) == pytest.approx(
        (dmean, dlo, dhi))
    assert r["incoherence"] == pytest.approx(0.1) and r["heldout_nll"] == pytest.approx(3.0)
    assert r["mde"] == pytest.approx(min_detectable_effect(half_width=(hi - lo) / 2))
    assert list(res.runs["shift"]) == pytest.approx([m - base for m in m0 + m1])


def test_no_reduction_reports_the_smallest_detectable_one_and_holm():
    g = np.random.default_rng(0)
    m0 = list(0.4 + g.normal(0, 0.05, 4))
    noise = {lam: list(np.add(m0, g.normal(0, 0.05, 4))) for lam in (0.5, 2.0)}
    res = shift_reduction(runs({0.0: m0, **noise}), 0.0)
    ps = [stats.ttest_1samp(np.subtract(m0, noise[lam]), 0).pvalue for lam in (0.5, 2.0)]
    holm = [min(1, 2 * min(ps)), max(min(1, 2 * min(ps)), max(ps))]
    holm = [holm[0] if ps[0] <= ps[1] else holm[1], holm[1] if ps[0] <= ps[1] else holm[0]]
    for lam, want in zip((0.5, 2.0), holm, strict=True):
        r = res.row(lam)
        assert r["p_holm"] == pytest.approx(want)
        assert not r["significant"]
        half = (r["reduction_high"] - r["reduction_low"]) / 2
        assert r["mde"] == pytest.approx(2.8016 / 1.96 * half, rel=1e-3)
    assert not res.any_significant


def test_the_interval_covers_a_planted_reduction_at_its_level():
    """3 seeds, seed noise sd 0.05 around a true reduction of 0.1: the 95% t interval over
    seeds covers 0.1 in about 95% of simulated runs (the percentile bootstrap over 3 seeds
    would not)."""
    g = np.random.default_rng(11)
    covered, n_sim = 0, 200
    for _ in range(n_sim):
        m0 = 0.5 + g.normal(0, 0.05, 3)
        m1 = m0 - 0.1 + g.normal(0, 0.05, 3)
        r = shift_reduction(runs({0.0: list(m0), 1.0: list(m1)}), 0.0).row(1.0)
        covered += r["reduction_low"] <= 0.1 <= r["reduction_high"]
    assert 0.9 <= covered / n_sim <= 0.99


def test_relative_reduction_needs_a_shift_to_reduce():
    res = shift_reduction(runs({0.0: [0.01, -0.02, 0.0], 1.0: [0.0, -0.01, 0.01]}), 0.0)
    assert np.isnan(res.row(1.0)["relative"])  # the unblocked runs did not shift
    one = shift_reduction(runs({0.0: [0.5], 1.0: [0.3]}), 0.0)
    r = one.row(1.0)
    assert r["reduction"] == pytest.approx(0.2) and np.isnan(r["reduction_low"])
    assert np.isnan(r["p_holm"]) and not r["significant"] and np.isnan(r["mde"])
    iv = seed_interval([0.2, 0.2, 0.2])
    assert iv.low == iv.high == pytest.approx(0.2) and iv.pvalue == 0.0


def test_errors():
    with pytest.raises(DataError, match="lambda = 0"):
        shift_reduction(runs({1.0: [0.1, 0.2]}), 0.0)
    rows = runs({0.0: [0.1, 0.2], 1.0: [0.1, 0.2]})
    rows.append({"lam": 1.0, "seed": 5, "margin": 0.3})
    with pytest.raises(DataError, match=r"seeds \[5\] have no lambda-0 run"):
        shift_reduction(rows, 0.0)
    with pytest.raises(DataError, match="twice"):
        shift_reduction(runs({0.0: [0.1, 0.2]}) * 2, 0.0)
    with pytest.raises(DataError, match="missing"):
        shift_reduction([{"lam": 0.0, "seed": 0}], 0.0)
    with pytest.raises(ConfigError):
        shift_reduction(runs({0.0: [0.1, 0.2]}), 0.0, confidence=1.5)


def test_table_figure_and_round_trip(tmp_path):
    res = shift_reduction(runs({0.0: [0.5, 0.6, 0.55], 1.0: [0.2, 0.25, 0.3]},
                               {0.0: [1, 1, 1], 1.0: [0.9, 0.8, 1.0]}), 0.1,
                          organism_margin=0.4)
    table = res.table()
    assert list(table["lambda"]) == ["0 (unblocked)", "1"]
    assert table.loc[1, "per-seed reduction"] == "+0.300, +0.350, +0.250"
    assert table.loc[1, "shift reduction"].startswith("+0.300 [")
    for col in ("smallest detectable reduction", "in-domain margin lost", "incoherence",
                "held-out SFT NLL", "p (Holm)"):
        assert col in table
    cells = table.to_numpy().ravel()
    assert all(not isinstance(v, (list, dict)) and "[[" not in str(v) for v in cells)
    fig = res.figure()
    assert len(fig.data) == 2 and fig.layout.shapes
    res.save(tmp_path / "r")
    back = load_result(tmp_path / "r")
    pd.testing.assert_frame_equal(back.per_lambda, res.per_lambda, check_dtype=False)
    pd.testing.assert_frame_equal(back.runs, res.runs, check_dtype=False)
    assert back.table().equals(table)


def test_config_seeds_and_lambdas_are_checked():
    base = {"run": {"card": "tiny-random-llama"}}
    assert RunConfig.from_dict(base).block_em.seeds == [0, 1, 2]
    for bad, match in (({"seeds": []}, "seeds"), ({"seeds": [0, 0]}, "seeds"),
                       ({"seeds": [-1]}, "seeds"), ({"lambdas": [1.0, 2.0]}, "include 0"),
                       ({"lambdas": [0.0]}, "include 0"), ({"lambdas": [0.0, -1.0]}, "lambdas")):
        with pytest.raises(ConfigError, match=match):
            RunConfig.from_dict({**base, "block_em": bad})
    with pytest.raises(ConfigError, match="eval_tokens"):
        RunConfig.from_dict({**base, "sae": {"eval_tokens": 0}})


def test_recommended_lambda_weighs_reduction_against_incoherence():
    # incoherence = 0.1 * lambda in runs(): lambda 0.3 costs 3 points, lambda 1 costs 10
    base = 0.0
    m0 = [0.50, 0.52, 0.51]
    strong, medium = [0.10, 0.11, 0.12], [0.30, 0.31, 0.29]
    res = shift_reduction(runs({0.0: m0, 0.3: medium, 1.0: strong}), base)
    assert res.row(1.0)["significant"] and res.row(0.3)["significant"]
    assert res.recommended() == 0.3  # lambda 1 reduces more but is 10 points less coherent
    assert res.recommended(max_incoherence_increase=0.2) == 1.0
    assert res.to_dict()["recommended_lambda"] == 0.3
    flat = shift_reduction(runs({0.0: m0, 1.0: [0.49, 0.53, 0.50]}), base)
    assert flat.recommended() is None  # nothing significant: no recommendation
