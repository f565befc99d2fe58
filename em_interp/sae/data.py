"""Training data for SAEs: what :func:`~em_interp.sae.train.train_sae` accepts, turned into the
``[batch_size, d_in]`` batches SAE-Lens's ``SAETrainer`` pulls (its ``DataProvider``).

* a tensor ``[n, d_in]``: one seeded permutation per epoch (``Generator(seed + epoch)``), cut
  into exact batches, cycled until the token budget is spent;
* an :class:`~em_interp.activations.cache.ActivationStore`: ``store.iter_batches(hook, shuffle=True,
  seed=seed + epoch)`` per epoch, re-cut into exact batches (memory: one batch);
* an iterator of ``[b, d_in]`` tensors: re-cut into exact batches; running out is an error;
* local text (:func:`text_dataset`): handed to SAE-Lens's runner, which tokenizes it itself.

:func:`describe_data` says what the data is (kind, size, a hash where it can be identified), which
``train_sae`` records with the SAE and compares when asked to train the same SAE again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from em_interp.errors import DataError
from em_interp.inputs import as_prompt_list, left_pad, pad_id, prompts_hash, tokenizer_of

log = logging.getLogger(__name__)


def text_dataset(source):
    """A ``datasets.Dataset`` with a ``text`` column from strings, a ``.txt`` file (one document
    per non-empty line) or a ``.jsonl`` file (a ``text`` field per line): local text for
    :func:`train_sae`'s SAE-Lens runner path."""
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return source
    if isinstance(source, (str, Path)) and Path(source).suffix in (".txt", ".jsonl"):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"text file {str(path)!r} does not exist.")
        if path.suffix == ".txt":
            texts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        else:
            texts = []
            for i, ln in enumerate(path.read_text().splitlines(), 1):
                if ln.strip():
                    row = json.loads(ln)
                    if "text" not in row:
                        raise DataError(f"{str(path)!r} line {i} has no 'text' field.")
                    texts.append(row["text"])
    else:
        texts = [str(t) for t in source]
    if not texts:
        raise DataError("the text data is empty.")
    return datasets.Dataset.from_dict({"text": texts})


def is_store(x) -> bool:
    """True for an :class:`~em_interp.activations.cache.ActivationStore` (duck-typed)."""
    return hasattr(x, "iter_batches") and hasattr(x, "manifest") and hasattr(x, "hooks")


def is_text(x) -> bool:
    """True for local text: a ``datasets`` dataset or a ``.txt`` / ``.jsonl`` path."""
    mod = type(x).__module__
    if mod.startswith("datasets") and type(x).__name__ in ("Dataset", "IterableDataset"):
        return True
    return isinstance(x, (str, Path)) and Path(x).suffix in (".txt", ".jsonl")


def describe_data(model, hook: str, data) -> tuple[str, dict]:
    """(kind, JSON description with a hash when the data can be identified)."""
    if is_store(data):
        if hook not in data.hooks:
            raise DataError(f"the activation store {str(data.path)!r} has no {hook!r} (it has "
                            f"{data.hooks}); cache it with cache_activations(..., hooks=[{hook!r}"
                            "], reduce='none').")
        m = data.manifest
        info = {"kind": "store", "path": str(data.path), "reduce": data.reduce,
                "n_rows": data.n_rows, "n_prompts": data.n_prompts,
                "hash": m.get("prompts_hash"),
                "model": m.get("model_name") or (m.get("model") or {}).get("model_name")}
        if data.reduce != "none":
            log.info("training on a reduce=%r store: one row per prompt", data.reduce)
        return "store", info
    if torch.is_tensor(data):
        flat = data.detach().cpu().contiguous().reshape(-1)
        h = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        return "tensor", {"kind": "tensor", "shape": list(data.shape), "hash": h}
    if is_text(data):
        ds = text_dataset(data)
        n = len(ds) if hasattr(ds, "__len__") else None
        h = hashlib.sha256(json.dumps(ds["text"][:10_000] if n else []).encode()).hexdigest()[:16]
        return "text", {"kind": "text", "n_texts": n, "hash": h,
                        "source": str(data) if isinstance(data, (str, Path)) else "dataset"}
    if isinstance(data, Iterator):
        return "iterator", {"kind": "iterator"}
    items = as_prompt_list(data)
    info = {"kind": "prompts", "n_prompts": len(items), "hash": prompts_hash(data)}
    if hasattr(data, "describe") and hasattr(data, "meta"):
        info["prompt_set"] = data.describe()
    return "prompts", info


def exact_batches(chunks: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Re-cut a stream of ``[*, d]`` chunks into ``[batch_size, d]`` batches (drops a tail)."""
    pending: list[torch.Tensor] = []
    have = 0
    for c in chunks:
        c = c.flatten(1) if c.ndim > 2 else c
        while c.shape[0]:
            take = min(batch_size - have, c.shape[0])
            pending.append(c[:take])
            c, have = c[take:], have + take
            if have == batch_size:
                yield torch.cat(pending) if len(pending) > 1 else pending[0]
                pending, have = [], 0


def _epochs(make: Callable[[int], Iterable[torch.Tensor]], what: str) -> Iterator[torch.Tensor]:
    epoch = 0
    while True:
        got = False
        for chunk in make(epoch):
            got = True
            yield chunk
        if not got:
            raise DataError(f"{what} yielded no activations.")
        epoch += 1


def tensor_batches(x: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless exact batches of the rows of ``x``, epoch ``e`` in the order of
    ``randperm(n, generator=Generator().manual_seed(seed + e))``."""
    x = x.flatten(1) if x.ndim > 2 else x
    if x.shape[0] < batch_size:
        raise DataError(f"{x.shape[0]} activation rows are fewer than one batch ({batch_size}); "
                        "use more data or a smaller batch_size.")

    def make(epoch):
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
        return (x[perm[i:i + batch_size]] for i in range(0, x.shape[0], batch_size))

    return exact_batches(_epochs(make, "the tensor"), batch_size)


def store_batches(store, hook: str, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless exact batches of ``hook``'s rows of ``store``, a new shuffle each epoch."""
    return exact_batches(_epochs(lambda e: store.iter_batches(hook, batch_size, shuffle=True,
                                                               seed=seed + e),
                                  "the activation store"), batch_size)


def iterator_batches(it: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Exact batches of the rows ``it`` yields; a clear error if it runs out during training."""
    n = 0
    for b in exact_batches(it, batch_size):
        n += b.shape[0]
        yield b
    raise DataError(f"the activation iterator ran out after {n} rows; training needs "
                    "training_tokens rows (pass a longer iterator or fewer training_tokens).")


def capture_first(it: Iterator[torch.Tensor], into: list[torch.Tensor],
                   n: int) -> Iterator[torch.Tensor]:
    """Pass ``it`` through, keeping copies of its first ``n`` rows in ``into``."""
    have = 0
    for b in it:
        if have < n:
            into.append(b[:n - have].detach().clone())
            have += into[-1].shape[0]
        yield b


def special_token_ids(model) -> frozenset[int]:
    """BOS/EOS/pad/sep ids of the model's tokenizer (SAE-Lens's ``get_special_token_ids``)."""
    from sae_lens.util import get_special_token_ids

    try:
        return frozenset(get_special_token_ids(tokenizer_of(model)))
    except Exception:  # a model without a tokenizer: nothing to exclude
        return frozenset()


def text_windows(model, texts: list[str], context_size: int):
    """Plain-text windows (tokenizer BOS once, first ``context_size`` tokens), left-padded."""
    tok = tokenizer_of(model)
    rows = [tok(t, add_special_tokens=True)["input_ids"][:context_size] for t in texts]
    rows = [r for r in rows if len(r) > 1]
    if not rows:
        raise DataError("the evaluation texts are empty.")
    batch = left_pad(rows, pad_id(tok))
    return batch.tokens, batch.attention_mask
