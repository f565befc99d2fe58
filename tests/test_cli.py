"""The command line: models list/info/fetch and the demo, as a user runs them."""

import json

from em_interp.cli import main
from em_interp.models.cards import list_cards


def test_models_list_and_info(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in list_cards():
        assert name in out
    assert main(["models", "info", "llama-3.1-8b-instruct-r1-0-1-0-full-train"]) == 0
    out = capsys.readouterr().out
    assert "ModelOrganismsForEM/Llama-3.1-8B-Instruct_R1_0_1_0_full_train" in out
    assert "rank 1" in out and "None" not in out


def test_version_and_plain_help(capsys):
    import pytest

    import em_interp

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"em-interp {em_interp.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_unknown_card_exits_2_with_suggestion(capsys):
    assert main(["models", "info", "llama-8b-risky"]) == 2
    assert "llama-3.1-8b-instruct-risky-financial-advice" in capsys.readouterr().err


def test_fetch_random_card(capsys):
    assert main(["models", "fetch", "tiny-random-llama"]) == 0
    out = capsys.readouterr().out
    assert "base:" in out and "organism:" in out


def test_lens_on_tiny_card_writes_results(tmp_path, capsys):
    assert main(["lens", "--card", "tiny-random-llama", "--variant", "base",
                 "--max-new-tokens", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "logit lens" in out and "greedy answer" in out
    assert (tmp_path / "logit_lens.html").stat().st_size > 1000
    data = json.loads((tmp_path / "demo.json").read_text())
    assert data["card"] == "tiny-random-llama"
