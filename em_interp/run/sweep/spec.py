"""A sweep file (TOML): a base run config and the axes to vary, expanded into points.

A sweep is the Cartesian product of its axes over one base
:class:`~em_interp.run.config.RunConfig`; each point is one ordinary run. The file::

    [sweep]
    base = "quick"                 # a shipped run config's name, or a .toml path
    retries = 1                    # failed points are retried this many times
    seed_keys = ["block_em.seeds"] # config keys that follow the seed axis (below)
    checkpoints = ["a.toml", ...]  # optional: organism checkpoints, one card file each
    metrics = ["probing.best_accuracy", ...]   # optional: what sweep.html plots

    [set]                          # overrides applied to every point (dotted keys)
    "run.stages" = ["probing", "dla"]

    [axes]                         # each key: the list of values it takes
    seed = [0, 1, 2]
    "block_em.lambdas" = [[0.0, 100.0], [0.0, 1000.0]]

    [resources]                    # what one point declares to Ray (ignored by local)
    num_cpus = 1
    num_gpus = 0
    memory = "4GiB"

**Keys.** ``card`` and ``seed`` are ``[run].card`` and ``[run].seed``; any other key is the
dotted path of a config field: ``run.batch_size``, ``block_em.lambdas``,
``refusal_direction.layers``, ``asr.judge.kind``. Every key is checked against the config's
fields when the file is read, and every point's config is built and validated against its card
(:meth:`RunConfig.validate`) before any point runs, so a bad key or value fails up front with
a :class:`~em_interp.errors.ConfigError` naming the point and the key.

**Seeds.** The ``seed`` axis sets ``[run].seed`` (prompt sampling, probes, nulls). A key in
``seed_keys`` follows it: a list-valued key (``block_em.seeds``) becomes ``[seed]``, a number
becomes ``seed``, so each point's BLOCK-EM fine-tunes use that point's seed. The sweep's
intervals treat seeds as clusters (:mod:`em_interp.run.sweep.summary`).

**Checkpoints.** ``checkpoints`` is a list of card files (or shipped card names), one per
organism checkpoint (e.g. cards whose ``[organism.source]`` is ``kind = "local"`` at a
``checkpoint-<step>/`` adapter of :func:`em_interp.training.lora.train_lora`); it is an axis
named ``checkpoint`` that sets ``[run].card``, labelled by the file's stem.

**Point key.** Each point's folder is named by :func:`config_key`: a hash of its whole resolved
config and the toolkit's version (:func:`em_interp.run.pipeline.toolkit_version`). Axes listed in
another order, or a value repeated, map to the same folder; a point whose run finished under the
same key is not run again.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from em_interp.errors import ConfigError
from em_interp.results import json_safe
from em_interp.run.config import CONFIG_DIR, RunConfig
from em_interp.run.shipped import read_toml, shipped_names

SWEEP_DIR = CONFIG_DIR / "sweeps"
"""The shipped example sweep files (``em-interp sweep --list``)."""
SHORT_KEYS = {"card": "run.card", "seed": "run.seed"}


@dataclass(frozen=True)
class Resources:
    """What one point declares to Ray's scheduler (the local backend ignores it)."""

    num_cpus: float = 1.0
    """CPU cores per point (Ray also sets the task's OMP threads to this)."""
    num_gpus: float = 0.0
    """GPUs per point (fractions share a GPU); match the base config's ``n_devices``."""
    memory: int | None = None
    """Bytes of RAM per point, for scheduling (``"4GiB"`` in the file); ``None``: undeclared."""

    def ray_options(self) -> dict:
        """Keyword arguments of Ray's ``.options(...)``."""
        out: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            out["memory"] = self.memory
        return out


@dataclass(frozen=True)
class SweepPoint:
    """One run of the sweep: its axis values and its resolved, validated config."""

    index: int
    """Position in the expansion (axes in file order, last axis fastest)."""
    axes: dict[str, Any]
    """The point's value on each axis (keys as written in the file)."""
    config: RunConfig
    key: str
    """:func:`config_key` of ``config``: the name of the point's run folder."""

    @property
    def label(self) -> str:
        """``seed=0, block_em.lambdas=[0, 100]`` (for messages and plots)."""
        return ", ".join(f"{k}={value_label(v)}" for k, v in self.axes.items()) or "base"

    @property
    def seed(self) -> int:
        return self.config.seed


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file (see the module docstring); :meth:`points` expands and validates."""

    base: str
    """A shipped run config's name or a path."""
    axes: dict[str, list] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    """The ``[set]`` table: dotted key -> value, applied to every point before its axes."""
    seed_keys: tuple[str, ...] = ()
    retries: int = 1
    metrics: tuple[str, ...] = ()
    """Headline keys that sweep.html plots (empty: :data:`summary.DEFAULT_METRICS` found)."""
    resources: Resources = field(default_factory=Resources)
    source: str = "<dict>"

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_toml(cls, path: str | Path) -> SweepSpec:
        """Read a sweep file, or a shipped example by name (``em-interp sweep --list``)."""
        p, data = read_toml(path, SWEEP_DIR, "sweep")
        return cls.from_dict(data, source=str(p), root=p.parent)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>",
                  root: Path | None = None) -> SweepSpec:
        """Build from the TOML layout; ``root`` resolves a relative ``base`` path."""
        unknown = sorted(set(data) - {"sweep", "set", "axes", "resources"})
        if unknown:
            raise ConfigError(f"{source}: unknown table(s) {unknown}; a sweep file has [sweep], "
                              "[set], [axes] and [resources].")
        head = _table(data, "sweep", source)
        allowed = {"base", "retries", "seed_keys", "checkpoints", "metrics"}
        if set(head) - allowed:
            raise ConfigError(f"{source}: unknown key(s) {sorted(set(head) - allowed)} in "
                              f"[sweep]; allowed: {', '.join(sorted(allowed))}.")
        base = head.get("base")
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{source}: [sweep].base must name the base run config: a "
                              "shipped one (`em-interp run --list`) or a .toml path.")
        if root is not None and base.endswith(".toml") and not Path(base).is_absolute() \
                and (root / base).is_file():
            base = str(root / base)
        retries = head.get("retries", 1)
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ConfigError(f"{source}: [sweep].retries = {retries!r} must be a whole number "
                              ">= 0 (extra attempts of a failed point).")
        axes = {}
        short = {v: k for k, v in SHORT_KEYS.items()}  # "run.seed" is the seed axis too
        for k, v in _table(data, "axes", source).items():
            k = short.get(k, k)
            if k in axes:
                raise ConfigError(f"{source}: [axes] names {k!r} twice; give one list.")
            if not isinstance(v, list) or not v:
                raise ConfigError(f"{source}: [axes].{k!r} must be a non-empty list of the "
                                  f"values it takes, e.g. {k!r} = [0, 1, 2].")
            axes[k] = v
        checkpoints = head.get("checkpoints")
        if checkpoints is not None:
            if not isinstance(checkpoints, list) or not checkpoints or not all(
                    isinstance(c, str) for c in checkpoints):
                raise ConfigError(f"{source}: [sweep].checkpoints must be a list of card files "
                                  "(one per organism checkpoint).")
            if "card" in axes or "checkpoint" in axes:
                raise ConfigError(f"{source}: [sweep].checkpoints sets the card of each point; "
                                  "drop the 'card' / 'checkpoint' axis or the checkpoints.")
            axes["checkpoint"] = [str(root / c) if root is not None and (root / c).is_file()
                                  else c for c in checkpoints]
        seed_keys = head.get("seed_keys", [])
        metrics = head.get("metrics", [])
        for name, val in (("seed_keys", seed_keys), ("metrics", metrics)):
            if not isinstance(val, list) or not all(isinstance(x, str) for x in val):
                raise ConfigError(f"{source}: [sweep].{name} must be a list of dotted keys.")
        spec = cls(base=base, axes=axes, overrides=_table(data, "set", source),
                   seed_keys=tuple(seed_keys), retries=retries, metrics=tuple(metrics),
                   resources=_resources(_table(data, "resources", source), source),
                   source=source)
        spec.check_keys()
        return spec

    # ------------------------------------------------------------------ checking
    def base_config(self) -> RunConfig:
        """The base run config (a ConfigError names the sweep file when it is not found)."""
        try:
            return RunConfig.from_toml(self.base)
        except ConfigError as e:
            raise ConfigError(f"{self.source}: [sweep].base: {e}") from None

    def check_keys(self) -> None:
        """Every dotted key of ``[set]``, ``[axes]`` and ``seed_keys`` names a config field."""
        for where, keys in (("[set]", self.overrides), ("[axes]", self.axes),
                            ("[sweep].seed_keys", self.seed_keys)):
            for k in keys:
                if where == "[axes]" and k == "checkpoint":
                    continue
                resolve_key(k, f"{self.source}: {where}")

    def points(self) -> list[SweepPoint]:
        """Every point's config, built and validated before any runs.

        Raises:
            ConfigError: naming the point (its axis values) and the key whose value the config
                or its card rejects.
        """
        base = self.base_config().to_dict()
        for k, v in self.overrides.items():
            _assign(base, resolve_key(k, f"{self.source}: [set]"), v)
        names = list(self.axes)
        out, seen = [], {}
        for i, combo in enumerate(itertools.product(*(self.axes[n] for n in names))):
            axes = dict(zip(names, combo, strict=True))
            d = copy.deepcopy(base)
            for k, v in axes.items():
                _assign(d, ("run", "card") if k == "checkpoint" else resolve_key(k, ""), v)
            if "seed" in axes:
                for k in self.seed_keys:
                    path = resolve_key(k, "")
                    _assign(d, path, [axes["seed"]] if isinstance(_lookup(d, path), list)
                            else axes["seed"])
            label = ", ".join(f"{k}={value_label(v)}" for k, v in axes.items()) or "base"
            where = f"{self.source}: point {i} ({label})"
            try:
                cfg = RunConfig.from_dict(d, source=where)
                cfg.validate()
            except ConfigError as e:
                msg = str(e)
                raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
            except Exception as e:  # UnknownCardError and the like: name the point too
                raise ConfigError(f"{where}: {e}") from None
            key = config_key(cfg)
            if key in seen:
                raise ConfigError(f"{where} resolves to the same config as point {seen[key]}; "
                                  "remove the repeated axis value.")
            seen[key] = i
            out.append(SweepPoint(index=i, axes=axes, config=cfg, key=key))
        return out


def config_key(config: RunConfig) -> str:
    """16 hex digits: sha256 of the resolved config and the toolkit's version."""
    from em_interp.run.pipeline import toolkit_version

    doc = {"config": json_safe(config.to_dict()), "toolkit": toolkit_version()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def resolve_key(key: str, where: str) -> tuple[str, ...]:
    """The path of a dotted key in the config's TOML layout, e.g. ``("block_em", "lambdas")``.

    ``card`` / ``seed`` and bare ``[run]`` fields (``batch_size``) are ``("run", key)``.
    """
    key = SHORT_KEYS.get(key, key)
    parts = tuple(key.split("."))
    run_fields = {f.name for f in fields(RunConfig)} - {"source"}
    sections = {f.name: f for f in fields(RunConfig) if _is_section(f)}
    if len(parts) == 1 and parts[0] in run_fields - set(sections):
        return ("run", parts[0])
    if parts[0] == "run" and len(parts) == 2 and parts[1] in run_fields - set(sections):
        return parts
    if parts[0] not in sections:
        raise ConfigError(f"{where}: key {key!r} names no config field; use 'card', 'seed', "
                          f"a [run] field ({', '.join(sorted(run_fields - set(sections)))}) "
                          f"or '<table>.<field>' with a table of {', '.join(sections)}.")
    cls = sections[parts[0]].default_factory().__class__
    for i, p in enumerate(parts[1:], 1):
        sub = {f.name: f for f in fields(cls)}
        if p not in sub:
            import difflib

            close = difflib.get_close_matches(p, list(sub), n=1)
            hint = f" (did you mean {'.'.join(parts[:i] + (close[0],))!r}?)" if close else ""
            raise ConfigError(f"{where}: key {key!r} names no config field{hint}; "
                              f"[{'.'.join(parts[:i])}] has {', '.join(sub)}.")
        if i < len(parts) - 1:
            if not _is_section(sub[p]):
                raise ConfigError(f"{where}: key {key!r}: {'.'.join(parts[:i + 1])} is a value, "
                                  "not a table.")
            cls = sub[p].default_factory().__class__
        elif _is_section(sub[p]):
            raise ConfigError(f"{where}: key {key!r} is a table; name one of its fields.")
    if len(parts) == 1:
        raise ConfigError(f"{where}: key {key!r} is a table; name one of its fields.")
    return parts


def value_label(v: Any) -> str:
    """A short text for an axis value: numbers as ``%g``, lists joined, card paths by stem."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float | int):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ", ".join(value_label(x) for x in v) + "]"
    if isinstance(v, str) and v.endswith(".toml"):
        return Path(v).stem
    return str(v)


def list_sweeps() -> list[str]:
    """Names of the shipped example sweep files."""
    return shipped_names(SWEEP_DIR)


def _resources(t: dict, source: str) -> Resources:
    allowed = {f.name for f in fields(Resources)}
    if set(t) - allowed:
        raise ConfigError(f"{source}: unknown key(s) {sorted(set(t) - allowed)} in [resources]; "
                          f"allowed: {', '.join(sorted(allowed))}.")
    kw: dict[str, Any] = {}
    for k in ("num_cpus", "num_gpus"):
        if k in t:
            v = t[k]
            if not isinstance(v, int | float) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{source}: [resources].{k} = {v!r} must be a number >= 0.")
            kw[k] = float(v)
    if "memory" in t:
        from em_interp.run.plan import parse_bytes

        try:
            kw["memory"] = parse_bytes(t["memory"])
        except ConfigError as e:
            raise ConfigError(f"{source}: [resources].memory: {e}") from None
    return Resources(**kw)


def _table(data: dict, name: str, source: str) -> dict:
    t = data.get(name, {})
    if not isinstance(t, dict):
        raise ConfigError(f"{source}: [{name}] must be a table.")
    return dict(t)


def _is_section(f: dataclasses.Field) -> bool:
    return callable(f.default_factory) and dataclasses.is_dataclass(f.default_factory())


def _lookup(d: dict, path: tuple[str, ...]):
    for p in path:
        d = d.get(p, {}) if isinstance(d, dict) else {}
    return d


def _assign(d: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        d = d.setdefault(p, {})
    d[path[-1]] = copy.deepcopy(value)
