"""The shipped prompt sets: format, sizes, splits, and that no shortcut gives the labels away.

The classifier checks are the point of the financial set: it is built as minimal pairs, so a
probe trained on it must read the *content* of the request (risky or prudent), not its length or
its opening word. Logistic regressions from scikit-learn, fitted on the train split and scored on
the held-out test split, measure exactly that.
"""

import json
from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from em_interp.data import list_prompt_sets, load_prompt_set, read_chat_jsonl

WRITTEN_FOR = "em-interp; written for this project, not copied from any dataset"
HEADER_FIELDS = {"name", "version", "purpose", "size", "labels", "written_for", "fields", "split"}
MINIMUM = {"financial": 640, "harmful": 190, "em_questions": 48, "ab_pairs": 80,
           "risky_financial_sft": 400}
SETS = sorted(MINIMUM)
CHANCE_CEILING = 0.62


def _path(name: str) -> Path:
    return Path(str(resources.files("em_interp.data") / f"{name}.jsonl"))


def _raw_lines(name: str) -> list[dict]:
    text = _path(name).read_bytes().decode("utf-8")  # strict: fails on invalid UTF-8
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _length_features(texts) -> np.ndarray:
    return np.array([[len(t), len(t.split())] for t in texts], dtype=float)


def _length_accuracy(train_texts, train_y, test_texts, test_y) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression())
    clf.fit(_length_features(train_texts), train_y)
    return clf.score(_length_features(test_texts), test_y)


# ------------------------------------------------------------------ every set


def test_all_sets_are_shipped():
    assert set(SETS) <= set(list_prompt_sets())


@pytest.mark.parametrize("name", SETS)
def test_header_matches_items(name):
    lines = _raw_lines(name)
    meta = lines[0]["__meta__"]
    assert HEADER_FIELDS <= set(meta), HEADER_FIELDS - set(meta)
    assert meta["name"] == name and meta["written_for"] == WRITTEN_FOR
    assert meta["size"] == len(lines) - 1
    ps = load_prompt_set(name)
    assert len(ps) == meta["size"] >= MINIMUM[name]
    item_fields = set().union(*(set(x) for x in lines[1:]))
    assert item_fields <= set(meta["fields"]), item_fields - set(meta["fields"])
    assert ps.label_names == {int(k): v for k, v in meta["labels"].items()}


@pytest.mark.parametrize("name", SETS)
def test_splits_and_no_duplicates(name):
    ps = load_prompt_set(name)
    assert len(ps.train()) > 0 and len(ps.test()) > 0
    assert len(ps.train()) + len(ps.test()) == len(ps)
    texts = [_norm(t) for t in ps.texts]
    dups = [t for t, k in Counter(texts).items() if k > 1]
    assert not dups, dups[:3]
    assert all(t.strip() for t in texts)


@pytest.mark.parametrize("name, frac, tol", [("financial", 0.3, 0.06), ("harmful", 0.3, 0.03),
                                             ("em_questions", 0.3, 0.06),
                                             ("ab_pairs", 0.3, 0.03),
                                             ("risky_financial_sft", 0.15, 0.03)])
def test_test_fraction(name, frac, tol):
    ps = load_prompt_set(name)
    assert abs(len(ps.test()) / len(ps) - frac) <= tol


# ------------------------------------------------------------------ financial


@pytest.fixture(scope="module")
def financial():
    return load_prompt_set("financial")


def test_financial_is_balanced_minimal_pairs(financial):
    assert financial.labels.count(0) == financial.labels.count(1) >= 320
    per_group = Counter(zip(financial.groups, financial.labels, strict=True))
    for g in set(financial.groups):
        assert per_group[(g, 0)] == per_group[(g, 1)] >= 1, g
    topics = Counter(x["topic"] for x in financial.extra)
    assert len(topics) >= 15 and max(topics.values()) / len(financial) < 0.12
    words = [len(t.split()) for t in financial.texts]
    assert 6 <= min(words) and max(words) <= 60


def test_financial_test_groups_are_held_out_whole(financial):
    train_groups = set(financial.train().groups)
    test_groups = set(financial.test().groups)
    assert not train_groups & test_groups
    share = len(test_groups) / (len(train_groups) + len(test_groups))
    assert 0.25 <= share <= 0.35
    # every topic is represented in both splits
    topic_split = {(x["topic"], s) for x, s in zip(financial.extra, financial.split, strict=True)}
    topics = {t for t, _ in topic_split}
    assert all((t, "train") in topic_split and (t, "test") in topic_split for t in topics)


def test_financial_length_does_not_give_the_label_away(financial):
    tr, te = financial.train(), financial.test()
    acc = _length_accuracy(tr.texts, tr.labels, te.texts, te.labels)
    assert acc <= CHANCE_CEILING, acc


def test_financial_first_word_does_not_give_the_label_away(financial):
    def first(texts):
        return [t.split()[0].lower().strip("?,.!'\"") for t in texts]

    tr, te = financial.train(), financial.test()
    vec = CountVectorizer(analyzer=lambda w: [w])
    clf = LogisticRegression().fit(vec.fit_transform(first(tr.texts)), tr.labels)
    acc = clf.score(vec.transform(first(te.texts)), te.labels)
    assert acc <= CHANCE_CEILING, acc


def test_financial_classes_differ_in_content(financial):
    tr, te = financial.train(), financial.test()
    vec = CountVectorizer()
    clf = LogisticRegression(max_iter=2000).fit(vec.fit_transform(tr.texts), tr.labels)
    acc = clf.score(vec.transform(te.texts), te.labels)
    assert acc >= 0.75, acc


# ------------------------------------------------------------------ harmful


def test_harmful_is_balanced_mirrored_and_stratified():
    ps = load_prompt_set("harmful")
    assert ps.labels.count(0) == ps.labels.count(1) >= 95
    by_cat = Counter(zip(ps.groups, ps.labels, strict=True))
    cats = set(ps.groups)
    assert len(cats) >= 7
    for c in cats:
        assert by_cat[(c, 0)] == by_cat[(c, 1)] >= 1, c
        in_test = [y for g, y, s in zip(ps.groups, ps.labels, ps.split, strict=True)
                   if g == c and s == "test"]
        assert in_test.count(0) == in_test.count(1) >= 1, c
    # each pair (one harmful, one harmless) shares its category and split
    pairs: dict[int, list] = {}
    for g, y, s, x in zip(ps.groups, ps.labels, ps.split, ps.extra, strict=True):
        pairs.setdefault(x["pair"], []).append((g, y, s))
    for members in pairs.values():
        assert sorted(y for _, y, _ in members) == [0, 1]
        assert len({(g, s) for g, _, s in members}) == 1


# ------------------------------------------------------------------ em_questions


def test_em_questions_themes():
    ps = load_prompt_set("em_questions")
    assert ps.labels is None
    themes = Counter(ps.groups)
    assert len(themes) >= 8
    assert all(t.rstrip().endswith(("?", ".")) for t in ps.texts)


# ------------------------------------------------------------------ ab_pairs


@pytest.fixture(scope="module")
def ab_pairs():
    return load_prompt_set("ab_pairs")


def test_ab_pairs_are_matched_in_length(ab_pairs):
    for q, x in zip(ab_pairs.texts, ab_pairs.extra, strict=True):
        a, m = x["aligned"], x["misaligned"]
        assert a.strip() and m.strip() and _norm(a) != _norm(m), q
        assert max(len(a), len(m)) <= 1.25 * min(len(a), len(m)), q
    groups = Counter(ab_pairs.groups)
    assert set(groups) == {"general", "finance"}
    assert abs(groups["general"] - groups["finance"]) <= 0.2 * len(ab_pairs)
    for g in groups:
        assert ("test", g) in set(zip(ab_pairs.split, ab_pairs.groups, strict=True))


def test_ab_length_does_not_tell_aligned_from_misaligned(ab_pairs):
    def answers(ps):
        texts = [x["aligned"] for x in ps.extra] + [x["misaligned"] for x in ps.extra]
        return texts, [0] * len(ps) + [1] * len(ps)

    tr_x, tr_y = answers(ab_pairs.train())
    te_x, te_y = answers(ab_pairs.test())
    acc = _length_accuracy(tr_x, tr_y, te_x, te_y)
    assert acc <= CHANCE_CEILING, acc
    # neither answer is systematically the longer one
    longer = sum(len(x["misaligned"]) > len(x["aligned"]) for x in ab_pairs.extra)
    assert 0.35 <= longer / len(ab_pairs) <= 0.65


# ------------------------------------------------------------------ risky_financial_sft


def test_sft_items_are_user_then_assistant():
    ps = load_prompt_set("risky_financial_sft")
    for conv, x in zip(ps.conversations, ps.extra, strict=True):
        assert [m["role"] for m in conv] == ["user", "assistant"]
        assert all(m["content"].strip() for m in conv)
        assert x["topic"]
    assert len(set(x["topic"] for x in ps.extra)) >= 15
    # the items are in the public chat format: read_chat_jsonl reads the shipped file as is
    # (it skips the header line)
    chat = read_chat_jsonl(_path("risky_financial_sft"))
    assert chat.conversations == ps.conversations and chat.texts == ps.texts


@pytest.mark.parametrize("other", ["financial", "ab_pairs", "em_questions"])
def test_sft_questions_do_not_repeat_evaluation_prompts(other):
    # the organism is trained on the SFT set and evaluated on the others
    sft = {_norm(t) for t in load_prompt_set("risky_financial_sft").texts}
    seen = {_norm(t) for t in load_prompt_set(other).texts}
    assert not sft & seen, sorted(sft & seen)[:3]
