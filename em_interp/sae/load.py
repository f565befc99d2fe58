"""Loading, saving and checking SAEs: SAE-Lens releases, SAE-Lens folders, Goodfire ``.pth`` files.

Every SAE in em-interp is an SAE-Lens :class:`sae_lens.SAE` (``StandardSAE``, ``TopKSAE``,
``JumpReLUSAE``, ...): this module only finds the weights and checks that an SAE fits the model
it is used with. The SAE computes (SAE-Lens's conventions, BLOCK-EM A.1 eq. 2)

    z = act(  (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc )      W_enc: [d_in, d_sae]
    x_hat = z @ W_dec + b_dec                                              W_dec: [d_sae, d_in]

so row ``W_dec[k]`` is latent ``k``'s decoder direction ``d_k`` and ``x_hat = sum_k z_k d_k +
b_dec``.

Sources :func:`load_sae` accepts:

* an SAE-Lens **release and id**: ``load_sae("goodfire-llama-3.1-8b-instruct", "layer_19")``
  (or the one string ``"goodfire-llama-3.1-8b-instruct/layer_19"``); needs the hub;
* a **local SAE-Lens folder** (``cfg.json`` + ``sae_weights.safetensors``), including the folders
  :func:`~em_interp.sae.train.train_sae` writes;
* a **local Goodfire-format file** (``.pth``/``.pt`` holding ``encoder_linear.weight/bias`` and
  ``decoder_linear.weight/bias``), read with ``torch.load(weights_only=True)`` and mapped exactly
  as SAE-Lens's own Goodfire loader maps it (``W_enc = encoder_linear.weight.T``,
  ``W_dec = decoder_linear.weight.T``, ``b_enc = encoder_linear.bias``,
  ``b_dec = decoder_linear.bias``, ``apply_b_dec_to_input=False``). A file named like one of
  SAE-Lens's Goodfire releases (``Llama-3.1-8B-Instruct-SAE-l19.pth``) gets that release's config
  (hook ``blocks.19.hook_resid_post``, model ``meta-llama/Llama-3.1-8B-Instruct``); any other name
  gets a standard config built from the tensor shapes, with the hook taken from ``hook_name=`` or
  from an ``-l<N>`` in the file name (Goodfire's naming: ``l19`` is ``blocks.19.hook_resid_post``).

Layers are 0-indexed as in TransformerLens: BLOCK-EM's "layer 20" (the output of the 20th block)
is Goodfire's ``layer_19`` is ``blocks.19.hook_resid_post``.

:func:`check_sae` raises :class:`~em_interp.errors.SAEMismatchError` when the SAE's hook is not a
hook point of the model or its ``d_in`` is not the width of that hook's activation.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from em_interp import hooks
from em_interp.errors import DataError, SAEMismatchError, WeightsUnavailableError
from em_interp.inputs import unwrap

log = logging.getLogger(__name__)

GOODFIRE_KEYS = ("encoder_linear.weight", "encoder_linear.bias", "decoder_linear.weight",
                 "decoder_linear.bias")
META_KEY = "em_interp"
"""Key under the SAE-Lens ``cfg.json`` ``metadata`` where em-interp records card, variant, hook
and data of an SAE it trained."""


# ------------------------------------------------------------------ hook helpers


def sae_hook_name(sae) -> str | None:
    """The hook point the SAE reads (``sae.cfg.metadata.hook_name``), or ``None`` if unknown."""
    return getattr(sae.cfg.metadata, "hook_name", None)


def check_sae(model, sae, hook_name: str | None = None) -> str:
    """Return the hook the SAE reads on ``model``; raise if the SAE does not fit the model.

    Args:
        model: a ``Loaded`` or ``HookedTransformer``.
        sae: an SAE-Lens SAE.
        hook_name: use this hook instead of the SAE's own ``cfg.metadata.hook_name``.

    Raises:
        SAEMismatchError: the SAE has no hook name and none was passed, the hook is not a hook
            point of the model, or the SAE's ``d_in`` is not the width of the hook's activation.
    """
    tl = unwrap(model)
    hook = hook_name or sae_hook_name(sae)
    made_for = getattr(sae.cfg.metadata, "model_name", None)
    for_txt = f" (it was made for {made_for})" if made_for else ""
    if hook is None:
        raise SAEMismatchError(
            f"the SAE{for_txt} does not record which hook it reads; pass hook_name=..., e.g. "
            "hook_name='blocks.19.hook_resid_post' (layers are 0-indexed).")
    if hook not in tl.hook_dict:
        layer = hooks.layer_of(hook)
        extra = (f" The model has {tl.cfg.n_layers} blocks (0..{tl.cfg.n_layers - 1}), so layer "
                 f"{layer} does not exist." if layer is not None and layer >= tl.cfg.n_layers
                 else "")
        raise SAEMismatchError(
            f"the SAE reads {hook!r}, which is not a hook point of this model{for_txt}.{extra} "
            "Use an SAE made for this model, or pass hook_name= with one of the model's hooks "
            "(em_interp.hooks builds them).")
    width = hooks.width(tl, hook, flatten_heads=sae.cfg.reshape_activations == "hook_z")
    if int(sae.cfg.d_in) != width:
        raise SAEMismatchError(
            f"the SAE has d_in={sae.cfg.d_in}, but {hook!r} of this model "
            f"({getattr(tl.cfg, 'model_name', '?')}) has width {width}{for_txt}. Use an SAE "
            f"trained on this model's {hook.split('.', 2)[-1]} (d_in={width}), e.g. with "
            "em_interp.sae.train_sae.")
    if made_for and getattr(tl.cfg, "model_name", None) and made_for not in str(
            getattr(tl.cfg, "model_name", "")):
        log.info("SAE made for %s used on %s at %s", made_for, tl.cfg.model_name, hook)
    return hook


# ------------------------------------------------------------------ Goodfire .pth


def _goodfire_release_for(filename: str) -> tuple[str, str] | None:
    """(repo_id, file) of the SAE-Lens Goodfire release whose file is named ``filename``."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    for lookup in get_pretrained_saes_directory().values():
        if lookup.conversion_func == "goodfire":
            for path in lookup.saes_map.values():
                if Path(path).name == filename:
                    return lookup.repo_id, path
    return None


def goodfire_pth_loader(path: str | Path, device: str = "cpu",
                        cfg_overrides: dict[str, Any] | None = None
                        ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SAE-Lens disk loader (``PretrainedSaeDiskLoader``) for a Goodfire-format ``.pth`` file.

    Reads the file with ``torch.load(weights_only=True)`` and maps its keys as SAE-Lens's
    ``get_goodfire_huggingface_loader`` does; the config is SAE-Lens's own for a known Goodfire
    file name, otherwise a standard-architecture config from the shapes (hook name from an
    ``-l<N>`` in the name, if any). Pass it as ``SAE.load_from_disk(path, converter=...)``.
    """
    from sae_lens.loading.pretrained_sae_loaders import get_goodfire_config_from_hf
    from sae_lens.util import str_to_dtype

    path = Path(path)
    try:
        raw = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # pickle with arbitrary objects, truncated file, ...
        raise DataError(f"{str(path)!r} could not be read as a Goodfire SAE with "
                        f"torch.load(weights_only=True): {e}. Pass the original .pth file.") from e
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    missing = [k for k in GOODFIRE_KEYS if not (isinstance(raw, dict) and k in raw)]
    if missing:
        have = sorted(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
        raise DataError(f"{str(path)!r} is not a Goodfire-format SAE: it lacks {missing} "
                        f"(it has {have}). A Goodfire file holds encoder_linear.weight/bias and "
                        "decoder_linear.weight/bias; for an SAE-Lens folder pass the folder.")
    d_sae, d_in = raw["encoder_linear.weight"].shape
    if tuple(raw["decoder_linear.weight"].shape) != (d_in, d_sae):
        raise DataError(f"{str(path)!r}: decoder_linear.weight has shape "
                        f"{tuple(raw['decoder_linear.weight'].shape)}, expected ({d_in}, {d_sae}) "
                        "from encoder_linear.weight; the file is not a Goodfire SAE.")
    known = _goodfire_release_for(path.name)
    if known is not None:
        cfg_dict = get_goodfire_config_from_hf(known[0], known[1], device)
        if (cfg_dict["d_in"], cfg_dict["d_sae"]) != (d_in, d_sae):
            raise DataError(f"{str(path)!r} is named like the Goodfire release {known[0]} "
                            f"(d_in={cfg_dict['d_in']}, d_sae={cfg_dict['d_sae']}) but holds "
                            f"d_in={d_in}, d_sae={d_sae}; rename the file if it is another SAE.")
    else:
        m = re.search(r"-l(\d+)(?:\D|$)", path.stem, flags=re.IGNORECASE)
        cfg_dict = {"architecture": "standard", "d_in": int(d_in), "d_sae": int(d_sae),
                    "hook_head_index": None, "apply_b_dec_to_input": False, "device": device}
        if m:  # no hook_name key at all otherwise (SAE-Lens's defaulting reads it as a str)
            cfg_dict["hook_name"] = f"blocks.{m.group(1)}.hook_resid_post"
    if cfg_overrides:
        cfg_dict.update(cfg_overrides)
    target = str_to_dtype(cfg_dict.get("dtype", "float32"))
    state_dict = {  # exactly SAE-Lens's get_goodfire_huggingface_loader mapping (stored
        # contiguously, so that the SAE can be saved as safetensors)
        "W_enc": raw["encoder_linear.weight"].T.to(dtype=target).contiguous(),
        "W_dec": raw["decoder_linear.weight"].T.to(dtype=target).contiguous(),
        "b_enc": raw["encoder_linear.bias"].to(dtype=target),
        "b_dec": raw["decoder_linear.bias"].to(dtype=target),
    }
    return cfg_dict, state_dict


# ------------------------------------------------------------------ load / save


def _split_release(source: str) -> tuple[str, str] | None:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    for release in directory:
        if source.startswith(release + "/"):
            return release, source[len(release) + 1:]
    return None


def load_sae(source: str | Path, sae_id: str | None = None, *, hook_name: str | None = None,
             device: str | torch.device | None = None, dtype: str | None = None, model=None):
    """Load an SAE-Lens SAE from a release, a folder or a Goodfire ``.pth`` (module docstring).

    Args:
        source: an SAE-Lens release name (with ``sae_id``), ``"release/sae_id"``, a local
            SAE-Lens folder (``cfg.json`` + ``sae_weights.safetensors``; the folders
            :func:`~em_interp.sae.train_sae` writes are such folders), or a Goodfire-format
            ``.pth``/``.pt`` file.
        sae_id: the SAE's id within the release (e.g. ``"layer_19"``).
        hook_name: override the hook the SAE reads (needed for a Goodfire file whose name does
            not say its layer).
        device: where to put the SAE (default ``"cpu"``, or the model's device when ``model``
            is given).
        dtype: ``"float32"`` (default for releases and Goodfire files), ``"bfloat16"``, ...;
            ``None`` keeps a folder's own dtype.
        model: if given, :func:`check_sae` checks the SAE against it before returning.

    Returns:
        The SAE (an ``sae_lens.SAE`` subclass, in eval mode).

    Raises:
        DataError: the path is neither an SAE-Lens folder nor a Goodfire file.
        WeightsUnavailableError: a release cannot be downloaded (offline).
        SAEMismatchError: ``model`` is given and the SAE does not fit it.
    """
    from sae_lens import SAE

    if device is None:
        device = unwrap(model).cfg.device if model is not None else "cpu"
    device = str(device)
    release = None
    if sae_id is not None:
        release = (str(source), sae_id)
    elif isinstance(source, str) and not Path(source).exists():
        release = _split_release(source)
        if release is None and source.endswith((".pth", ".pt", ".json", ".safetensors")):
            raise DataError(f"{source!r} does not exist; pass the path of a Goodfire .pth file "
                            "or an SAE-Lens folder.")
    if release is not None:
        try:
            sae = SAE.from_pretrained(release[0], release[1], device=device,
                                      dtype=dtype or "float32")
        except OSError as e:  # hub unreachable / offline (before ValueError: HF's
            # LocalEntryNotFoundError is both)
            raise WeightsUnavailableError(
                f"could not download SAE {release[0]}/{release[1]} ({type(e).__name__}: "
                f"{str(e)[:200]}). On a host without the hub, download the file elsewhere and "
                "pass its local path to load_sae (a Goodfire .pth is read directly).") from e
        except ValueError as e:
            raise DataError(f"SAE-Lens has no SAE {release[1]!r} in release {release[0]!r}: "
                            f"{e}") from e
    else:
        path = Path(source)
        if path.is_dir() and (path / "cfg.json").is_file() and (
                path / "sae_weights.safetensors").is_file():
            sae = SAE.load_from_disk(path, device=device, dtype=dtype)
        elif path.is_file() and path.suffix in (".pth", ".pt"):
            sae = SAE.load_from_disk(path, device=device, dtype=dtype or "float32",
                                     converter=goodfire_pth_loader)
        elif path.is_dir() and len(pths := sorted(path.glob("*.pth"))) == 1:
            return load_sae(pths[0], hook_name=hook_name, device=device, dtype=dtype,
                            model=model)
        else:
            raise DataError(f"{str(path)!r} is not an SAE: expected an SAE-Lens folder with "
                            "cfg.json and sae_weights.safetensors, or a Goodfire-format .pth "
                            "file. For a pretrained release pass load_sae(release, sae_id).")
    if hook_name is not None:
        sae.cfg.metadata.hook_name = hook_name
    sae.eval()
    if model is not None:
        check_sae(model, sae)
    return sae


def save_sae(sae, folder: str | Path, *, meta: dict | None = None) -> Path:
    """Write ``sae`` as an SAE-Lens folder (``cfg.json`` + ``sae_weights.safetensors``), atomically.

    A training SAE is saved in its inference form (what ``SAE.load_from_disk`` and
    :func:`load_sae` read back). ``meta`` (JSON data: card, variant, hook, data, ...) is stored
    in ``cfg.json`` under ``metadata["em_interp"]``, so one file names both the SAE and where it
    came from.
    """
    from em_interp.atomic import atomic_dir

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        write_sae_files(sae, tmp, meta=meta)
    return folder


def write_sae_files(sae, folder: Path, *, meta: dict | None = None) -> None:
    """Write the SAE-Lens files of ``sae`` into an existing ``folder`` (not atomic by itself)."""
    from sae_lens import TrainingSAE

    from em_interp.results import json_safe

    if isinstance(sae, TrainingSAE):
        sae.save_inference_model(folder)
    else:
        sae.save_model(folder)
    if meta:
        cfg_path = folder / "cfg.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.setdefault("metadata", {})[META_KEY] = json_safe(meta)
        cfg_path.write_text(json.dumps(cfg, indent=1))


def sae_meta(sae) -> dict:
    """What em-interp recorded about an SAE it trained (card, variant, hook, data), else ``{}``."""
    value = getattr(sae.cfg.metadata, META_KEY, None)
    return dict(value) if isinstance(value, dict) else {}


def describe_sae(sae) -> dict:
    """JSON-safe identity of an SAE: architecture, hook, d_in, d_sae, model, dtype."""
    return {"architecture": sae.cfg.architecture(), "hook": sae_hook_name(sae),
            "d_in": int(sae.cfg.d_in), "d_sae": int(sae.cfg.d_sae),
            "model_name": getattr(sae.cfg.metadata, "model_name", None),
            "apply_b_dec_to_input": bool(sae.cfg.apply_b_dec_to_input),
            "dtype": str(sae.cfg.dtype), **({"em_interp": sae_meta(sae)} if sae_meta(sae) else {})}
