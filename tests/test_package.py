"""Package shape: the loading layer lives in ``em_interp.models``; the public API is unchanged."""

import importlib
import re
from pathlib import Path

import pytest

import em_interp

ROOT = Path(em_interp.__file__).parents[1]
MOVED = ("cards", "sources", "cache", "wheel_weights", "gguf_convert", "tiny_models",
         "lora_merge", "hooked", "weight_layout", "placement", "loading", "chat")


@pytest.mark.parametrize("name", MOVED)
def test_loading_modules_live_in_models_only(name):
    importlib.import_module(f"em_interp.models.{name}")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"em_interp.{name}")


def test_nothing_imports_the_old_paths():
    pattern = re.compile(r"em_interp\.(" + "|".join(MOVED) + r")\b")
    offenders = []
    for folder in ("em_interp", "tests", "benchmarks", "scripts", "notebooks", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".ipynb") and path.is_file():
                for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                    if pattern.search(line):
                        offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_public_api_is_unchanged():
    for name in ("load", "load_pair", "Loaded", "Pair", "list_cards", "get_card", "read_card",
                 "chat_tokens", "ChatTokens", "EMInterpError", "HookNameError"):
        assert getattr(em_interp, name) is not None
    from em_interp import hooks

    assert hooks.resid_post(3) == "blocks.3.hook_resid_post"
