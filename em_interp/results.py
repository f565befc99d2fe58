"""The result contract every analysis follows.

An analysis returns a frozen dataclass that derives from :class:`Result` and offers:

* ``.df`` -- a tidy :class:`pandas.DataFrame` (one row per observation, named columns);
* ``.figure(...)`` -- a plotly figure (displays inline in Jupyter, ``.write_html`` for files);
* ``.to_dict()`` -- the headline numbers, JSON-safe (what ``results.json`` of a run holds);
* ``.save(dir)`` / ``Cls.load(dir)`` -- JSON plus safetensors, never pickle.

Saving is generic, driven by the dataclass fields, so a new result type only declares its
fields and writes ``df``, ``figure`` and ``to_dict``:

* ``torch.Tensor`` and ``numpy.ndarray`` fields (and ``dict[str, tensor]`` fields) go to
  ``tensors.safetensors``; numpy arrays come back as numpy, tensors as tensors;
* ``pandas.DataFrame`` fields go to ``<field>.json`` (``orient="split"``, dtypes kept for
  numbers, strings and booleans);
* a field that is itself a :class:`Result` goes to a sub-folder ``<field>/``;
* everything else must be JSON data (str, int, float, bool, None, list, tuple, dict with str
  keys) and goes to ``result.json``; tuples come back as tuples when the field's default or
  annotation says so, lists otherwise.

The folder is written atomically (:func:`em_interp.atomic.atomic_dir`): a reader never sees
half a result. ``result.json`` records the class, so :func:`load_result` reopens any saved result
without knowing its type.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from em_interp.errors import DataError

FORMAT_VERSION = 1
R = TypeVar("R", bound="Result")


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy/torch scalars turned into Python numbers and NaN/inf into ``None``.

    Containers are converted recursively; tuples become lists; 0-d and 1-element tensors
    become numbers; other tensors and arrays become (nested) lists.
    """
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if _is_tensor(obj):
        return json_safe(obj.detach().cpu().tolist())
    raise TypeError(f"{type(obj).__name__} is not JSON data: {str(obj)[:80]!r}")


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _is_frame(x) -> bool:
    return type(x).__name__ == "DataFrame" and type(x).__module__.startswith("pandas")


def _is_tensor_dict(x) -> bool:
    return (isinstance(x, dict) and len(x) > 0
            and all(isinstance(k, str) and (_is_tensor(v) or isinstance(v, np.ndarray))
                    for k, v in x.items()))


@dataclasses.dataclass(frozen=True)
class Result:
    """Base class of every analysis result (see the module docstring for the contract)."""

    kind: ClassVar[str] = "result"
    """A short name for the analysis (``"probe"``, ``"patching"``, ...), used in reports."""

    @property
    def df(self):
        """A tidy DataFrame of the result."""
        raise NotImplementedError(f"{type(self).__name__} does not define .df")

    def figure(self, **kwargs):
        """The result's main plotly figure."""
        raise NotImplementedError(f"{type(self).__name__} does not define .figure()")

    def to_dict(self) -> dict:
        """Headline numbers, JSON-safe."""
        raise NotImplementedError(f"{type(self).__name__} does not define .to_dict()")

    # ------------------------------------------------------------------ Jupyter

    def _repr_html_(self) -> str:
        import html

        head = html.escape(json.dumps(json_safe(self.to_dict()), indent=1)[:2000])
        try:
            table = self.df.head(10).to_html(index=False)
        except NotImplementedError:
            table = ""
        return (f"<b>{type(self).__name__}</b><pre style='font-size:smaller'>{head}</pre>"
                f"{table}")

    # ------------------------------------------------------------------ save / load

    def save(self, out_dir: str | Path) -> Path:
        """Write the result to ``out_dir`` (JSON + safetensors, atomically); return the folder."""
        from em_interp.atomic import atomic_dir

        out_dir = Path(out_dir)
        with atomic_dir(out_dir, meta={"type": _qualname(type(self))}) as tmp:
            self._write(tmp)
        return out_dir

    def _write(self, folder: Path) -> None:
        from safetensors.torch import save_file

        tensors, fields, kinds = {}, {}, {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if _is_tensor(value) or isinstance(value, np.ndarray):
                tensors[f.name] = _to_torch(value)
                kinds[f.name] = "numpy" if isinstance(value, np.ndarray) else "tensor"
            elif _is_tensor_dict(value):
                for k, v in value.items():
                    tensors[f"{f.name}/{k}"] = _to_torch(v)
                kinds[f.name] = {"dict_of": "numpy" if isinstance(next(iter(value.values())),
                                                                   np.ndarray) else "tensor",
                                 "keys": list(value)}
            elif _is_frame(value):
                (folder / f"{f.name}.json").write_text(value.to_json(orient="split",
                                                                     index=False))
                kinds[f.name] = {"frame": {c: str(t) for c, t in value.dtypes.items()}}
            elif isinstance(value, Result):
                value.write_into(folder / f.name)
                kinds[f.name] = "result"
            else:
                try:
                    fields[f.name] = json_safe(value)
                except TypeError as e:
                    raise TypeError(f"{type(self).__name__}.{f.name}: {e}") from None
                kinds[f.name] = "json"
        if tensors:
            save_file({k: v.contiguous() for k, v in tensors.items()},
                      str(folder / "tensors.safetensors"))
        doc = {"type": _qualname(type(self)), "format_version": FORMAT_VERSION,
               "fields": fields, "field_kinds": kinds, "summary": json_safe(self.to_dict())}
        (folder / "result.json").write_text(json.dumps(doc, indent=1))

    def write_into(self, folder: Path) -> None:
        """Write into ``folder`` directly (no atomic swap): for a caller that already writes a
        larger folder atomically, such as a run stage or a result that holds results."""
        folder.mkdir(parents=True, exist_ok=True)
        self._write(folder)

    @classmethod
    def load(cls: type[R], folder: str | Path) -> R:
        """Read a result written by :meth:`save`; the saved type must be ``cls`` or a subclass."""
        folder = Path(folder)
        doc = _read_doc(folder)
        saved = _class_named(doc["type"], folder, cls)
        if not issubclass(saved, cls):
            raise DataError(f"{str(folder)!r} holds a {doc['type']}, not a "
                            f"{_qualname(cls)}; open it with em_interp.results.load_result.")
        return saved._read(folder, doc)

    @classmethod
    def _read(cls, folder: Path, doc: dict):
        import pandas as pd

        tensors = {}
        if (folder / "tensors.safetensors").is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(folder / "tensors.safetensors"))
        kwargs = {}
        hints = {f.name: f for f in dataclasses.fields(cls)}
        for name, kind in doc["field_kinds"].items():
            if name not in hints:
                raise DataError(f"{str(folder)!r}: field {name!r} is not a field of "
                                f"{cls.__name__} (saved by another version?)")
            if kind == "tensor":
                kwargs[name] = tensors[name]
            elif kind == "numpy":
                kwargs[name] = tensors[name].numpy()
            elif kind == "result":
                sub = folder / name
                sub_doc = _read_doc(sub)
                kwargs[name] = _class_named(sub_doc["type"], sub, Result)._read(sub, sub_doc)
            elif kind == "json":
                kwargs[name] = _restore_tuple(hints[name], doc["fields"][name])
            elif isinstance(kind, dict) and "dict_of" in kind:
                conv = (lambda t: t.numpy()) if kind["dict_of"] == "numpy" else (lambda t: t)
                kwargs[name] = {k: conv(tensors[f"{name}/{k}"]) for k in kind["keys"]}
            elif isinstance(kind, dict) and "frame" in kind:
                frame = pd.read_json(folder / f"{name}.json", orient="split",
                                     dtype=kind["frame"])
                kwargs[name] = frame
            else:
                raise DataError(f"{str(folder)!r}: unknown field kind {kind!r} for {name!r}")
        return cls(**kwargs)


def _to_torch(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else (
        x.detach().cpu())


def _restore_tuple(f: dataclasses.Field, value):
    """JSON has no tuples: give a ``tuple[...]`` field (and ``tuple[tuple...`` items) back."""
    annotation = str(f.type).replace("typing.", "").strip()
    if not isinstance(value, list) or not (annotation.startswith("tuple")
                                           or isinstance(f.default, tuple)):
        return value
    inner = annotation.startswith("tuple[tuple")
    return tuple(tuple(v) if inner and isinstance(v, list) else v for v in value)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _read_doc(folder: Path) -> dict:
    path = folder / "result.json"
    if not path.is_file():
        raise DataError(f"{str(folder)!r} is not a saved result (no result.json); save one with "
                        "result.save(folder).")
    doc = json.loads(path.read_text())
    if doc.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{str(path)!r} has format version {doc.get('format_version')}; this "
                        f"em-interp reads version {FORMAT_VERSION}.")
    return doc


def _subclasses(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out


def _class_named(qualname: str, folder: Path, within: type[Result]) -> type[Result]:
    """The Result class saved as ``qualname``: a loaded subclass of ``within`` (so your own result
    types load), else one imported from em_interp (never an arbitrary module)."""
    for c in _subclasses(within):
        if _qualname(c) == qualname:
            return c
    module, _, name = qualname.rpartition(".")
    if not module.startswith("em_interp."):
        raise DataError(f"{str(folder)!r} holds a {qualname}, which is not a "
                        f"{_qualname(within)}; import the module that defines it and call "
                        f"{name}.load(...).")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise DataError(f"{str(folder)!r} holds a {qualname}, which this version of em-interp "
                        "does not have.") from None
    if not (isinstance(cls, type) and issubclass(cls, Result)):
        raise DataError(f"{qualname} is not a Result type.")
    return cls


def load_result(folder: str | Path) -> Result:
    """Reopen any result saved with :meth:`Result.save`, whatever its type."""
    return Result.load(folder)
