"""The public API, as a Jupyter user meets it: one entry point per technique, stable names.

Before the regrouping, ``em_interp.logit_lens`` was the function on first access and the module
after anything imported ``em_interp.logit_lens``; no lazy name was in ``__all__`` and nothing
tab-completed.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import em_interp

ROOT = Path(em_interp.__file__).parents[1]


def _resolve_all() -> dict[str, object]:
    return {name: getattr(em_interp, name) for name in em_interp.__all__}


def test_every_public_name_resolves_to_the_same_object_whatever_was_imported_before():
    first = _resolve_all()
    again = _resolve_all()
    for name in em_interp.__all__:
        assert again[name] is first[name], name
        assert not isinstance(first[name], types.ModuleType), f"{name} is a module"
    for info in pkgutil.walk_packages(em_interp.__path__, "em_interp."):
        importlib.import_module(info.name)
    after = _resolve_all()
    for name in em_interp.__all__:
        assert after[name] is first[name], f"{name} changed after importing every submodule"


def test_names_resolve_the_same_in_a_fresh_interpreter_after_submodule_imports():
    """The order that broke it: import a submodule first, then ask for the lazy name."""
    code = (
        "import em_interp.readouts.attribution, em_interp.behaviour.ab_metric, types\n"
        "import em_interp\n"
        "bad = [n for n in em_interp.__all__ if isinstance(getattr(em_interp, n), types.ModuleType)]\n"
        "assert not bad, bad\n"
        "assert callable(em_interp.logit_lens) and callable(em_interp.ab_metric)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_no_public_name_is_also_a_submodule():
    submodules = {info.name.rsplit(".", 1)[-1]
                  for info in pkgutil.iter_modules(em_interp.__path__)}
    clash = sorted(set(em_interp.__all__) & submodules)
    assert not clash, f"names that are both a public object and a submodule: {clash}"


def test_dir_lists_the_api_and_the_family_packages_for_tab_completion():
    listed = dir(em_interp)
    for name in (*em_interp.__all__, "patching", "sae", "block_em", "representations"):
        assert name in listed, name
    assert "_LAZY" not in listed


def test_one_entry_point_per_technique_is_public():
    for name in ("load", "load_pair", "probe_layers", "mean_difference", "introspection_scores",
                 "em_vs_refusal", "select_refusal_direction", "procrustes_align", "patch_sweep", "patch_heads",
                 "patch_neurons", "prefix_patch", "decode_patch", "ablate_heads",
                 "ablate_direction", "steer", "generate", "attack_success_rate", "ab_metric",
                 "logit_lens", "direct_logit_attribution", "train_lora", "train_sae",
                 "load_sae", "discover_latents", "train_blocked", "cache_activations",
                 "run_pipeline"):
        assert name in em_interp.__all__, name
        assert callable(getattr(em_interp, name)), name


def test_docs_api_page_lists_every_public_name():
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [n for n in em_interp.__all__ if f"`{n}`" not in text]
    assert not missing, f"docs/api.md does not list: {missing}"


TECHNIQUE_PAGES = ("activations", "probing", "directions", "refusal-direction", "patching", "interventions",
                   "generation", "asr", "logit-lens", "attribution", "saes", "training",
                   "block-em", "prompt-sets", "judges")


def test_each_technique_page_names_the_import_a_jupyter_user_types():
    import re

    for page in TECHNIQUE_PAGES:
        text = (ROOT / "docs" / f"{page}.md").read_text(encoding="utf-8")
        head = text.split("\n## ", 1)[0]
        assert '!!! tip "In Jupyter"' in head, f"docs/{page}.md has no import tip at the top"
        tip = head.split('!!! tip "In Jupyter"', 1)[1].lstrip("\n").split("\n", 1)[0]
        for name in re.findall(r"`em_interp\.(\w+)`", tip):
            assert name in em_interp.__all__, f"docs/{page}.md names em_interp.{name}"
