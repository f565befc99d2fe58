"""train_sae on local text checks SAE-Lens's sizes before any work: an activation buffer smaller
than one training batch, or text too short for one context window or one batch, is a ConfigError /
DataError naming the numbers and the fix (SAE-Lens itself raises a bare ValueError from deep inside
its runner, after the model has started)."""

import pytest

from em_interp.errors import ConfigError, DataError
from em_interp.sae import SAETrainConfig, train_sae
from em_interp.sae.train import check_text_sizes

HOOK = "blocks.1.hook_resid_post"  # tiny-random-llama: d_model 64


def _no_runner(monkeypatch):
    """Make constructing SAE-Lens's runner (the heavy part) fail loudly."""
    import sae_lens

    def boom(*a, **k):
        raise AssertionError("SAE-Lens's runner must not start")

    monkeypatch.setattr(sae_lens, "LanguageModelSAETrainingRunner", boom)


def test_buffer_smaller_than_a_batch_is_a_config_error_before_training(tiny_llama, tmp_path,
                                                                       monkeypatch):
    _no_runner(monkeypatch)
    texts = [f"Document {i}: the market rose and fell again today." for i in range(60)]
    cfg = SAETrainConfig(expansion_factor=2, batch_size=256, training_tokens=256 * 4,
                         context_size=32, n_batches_in_buffer=4, out_dir=str(tmp_path / "t"))
    with pytest.raises(ConfigError) as e:
        train_sae(tiny_llama, HOOK, texts_file(tmp_path, texts), cfg, progress=False)
    msg = str(e.value)
    # the numbers: 4 batches x 32 tokens = 128 < 256, and each way out with its value
    assert "4 x 32 = 128" in msg and "batch_size=256" in msg
    assert "n_batches_in_buffer to 8" in msg and "context_size to 64" in msg
    assert "batch_size to 128" in msg
    assert not (tmp_path / "t").exists()  # nothing written


def test_text_shorter_than_one_window_is_a_data_error(tiny_llama, tmp_path, monkeypatch):
    _no_runner(monkeypatch)
    cfg = SAETrainConfig(expansion_factor=2, batch_size=8, training_tokens=8 * 4,
                         context_size=128, out_dir=str(tmp_path / "t"))
    tok = tiny_llama.tokenizer
    texts = ["hello there", "a short one"]
    n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    with pytest.raises(DataError) as e:
        train_sae(tiny_llama, HOOK, texts_file(tmp_path, texts), cfg, progress=False)
    msg = str(e.value)
    assert f"{n} tokens in 2 texts" in msg and "context_size=128" in msg
    assert f"lower context_size to {n}." in msg
    assert not (tmp_path / "t").exists()


def test_text_shorter_than_one_batch_is_a_data_error(tiny_llama, tmp_path, monkeypatch):
    _no_runner(monkeypatch)
    texts = [f"Document {i}: the market rose." for i in range(4)]
    tok = tiny_llama.tokenizer
    n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert 16 < n < 200
    cfg = SAETrainConfig(expansion_factor=2, batch_size=200, training_tokens=200 * 2,
                         context_size=16, n_batches_in_buffer=16, out_dir=str(tmp_path / "t"))
    with pytest.raises(DataError, match=f"{n} tokens in 4 texts, fewer than one training "
                                        f"batch \\(batch_size=200\\).*batch_size to {n}"):
        train_sae(tiny_llama, HOOK, texts_file(tmp_path, texts), cfg, progress=False)


def test_sizes_at_the_boundary_pass(tiny_llama):
    import datasets

    cfg = SAETrainConfig(batch_size=128, training_tokens=128, context_size=32,
                         n_batches_in_buffer=4)  # buffer 4 x 32 = 128 = one batch: enough
    tok = tiny_llama.tokenizer
    texts = [f"Document {i}: the market rose and fell again today." for i in range(30)]
    n = check_text_sizes(cfg, datasets.Dataset.from_dict({"text": texts}), tok)
    assert n >= 128  # counting stops once both limits are met
    with pytest.raises(ConfigError, match="4 x 32 = 128"):
        check_text_sizes(SAETrainConfig(batch_size=129, training_tokens=129, context_size=32,
                                        n_batches_in_buffer=4), None, tok)


def texts_file(tmp_path, texts):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(texts))
    return path
