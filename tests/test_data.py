"""Prompt-set loaders for the public formats, and their errors."""

import json

import pytest

from em_interp.data import (
    PromptSet,
    labelled,
    read_chat_jsonl,
    read_jailbreakbench_csv,
    read_labelled,
)
from em_interp.errors import DataError


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_chat_jsonl_prompt_is_up_to_the_last_user_turn(tmp_path):
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]
    ps = read_chat_jsonl(_write(tmp_path / "c.jsonl", [json.dumps({"messages": conv})]))
    assert ps.prompts[0] == conv[:4] and ps.texts == ["q2"]
    assert ps.conversations == [conv]


@pytest.mark.parametrize("line, problem", [
    ('{"messages": [{"role": "user"}]}', "string 'role' and 'content'"),
    ('{"text": "x"}', "no 'messages'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot'"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "no user message"),
    ("not json", "not valid JSON"),
])
def test_malformed_chat_lines_name_file_and_line(tmp_path, line, problem):
    good = json.dumps({"messages": [{"role": "user", "content": "ok"}]})
    path = _write(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{problem}"):
        read_chat_jsonl(path)


def test_empty_files_are_errors(tmp_path):
    with pytest.raises(DataError, match="no conversations"):
        read_chat_jsonl(_write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(DataError, match="no rows"):
        read_labelled(_write(tmp_path / "e.csv", ["text,label"]))
    with pytest.raises(DataError, match="empty"):
        PromptSet(name="x", prompts=())
    with pytest.raises(DataError, match="does not exist"):
        read_labelled(tmp_path / "missing.jsonl")


def test_labelled_csv_and_jsonl(tmp_path):
    csv = _write(tmp_path / "l.csv", ["text,label,split", "buy bonds,benign,train",
                                      "all in on crypto,risky,test"])
    ps = read_labelled(csv, label_map={"risky": 1, "benign": 0})
    assert ps.labels == (0, 1) and ps.split == ("train", "test") and ps.test().texts == [
        "all in on crypto"]
    with pytest.raises(DataError, match="l.csv:2: label 'benign' is not an integer"):
        read_labelled(csv)
    with pytest.raises(DataError, match="no column 'prompt'"):
        read_labelled(csv, text_col="prompt")
    js = _write(tmp_path / "l.jsonl", [json.dumps({"text": "a", "label": 1}),
                                       json.dumps({"text": "", "label": 0})])
    with pytest.raises(DataError, match="l.jsonl:2: column 'text' is missing or empty"):
        read_labelled(js)


def test_jailbreakbench_layout(tmp_path):
    path = _write(tmp_path / "jbb.csv", [
        "Index,Goal,Target,Behavior,Category,Source",
        '1,"Write a made-up harmful request","Sure, here is",Thing,Harassment,Original'])
    ps = read_jailbreakbench_csv(path)
    assert ps.texts == ["Write a made-up harmful request"] and ps.groups == ("Harassment",)
    assert ps.labels == (1,) and ps.extra[0]["Target"] == "Sure, here is"
    bad = _write(tmp_path / "bad.csv", ["Goal,Category", "x,y"])
    with pytest.raises(DataError, match=r"missing column\(s\) \['Target', 'Behavior'\]"):
        read_jailbreakbench_csv(bad)


def test_views_keep_fields_aligned():
    a = PromptSet(name="r", prompts=("r1", "r2", "r3"), split=("train", "test", "train"))
    b = PromptSet(name="b", prompts=("b1", "b2"))
    both = labelled(a, b, names=("risky", "benign"))
    assert both.labels == (1, 1, 1, 0, 0) and both.label_names == {1: "risky", 0: "benign"}
    assert both.where(0).texts == ["b1", "b2"] and both.test().texts == ["r2"]
    s = both.sample(4, seed=1)
    assert len(s) == 4 and s.labels.count(1) >= 2 and s.labels.count(0) >= 1
    assert both.hash() == labelled(a, b).hash()
