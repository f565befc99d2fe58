"""Execute the tutorial notebooks, or check that their committed copies carry no outputs.

    python scripts/run_notebooks.py                          # run every notebooks/*.ipynb
    python scripts/run_notebooks.py --card tiny-random-llama # same, with CARD overridden
    python scripts/run_notebooks.py notebooks/01_loading.ipynb
    python scripts/run_notebooks.py --check-stripped         # fail if a notebook has outputs

Notebooks are executed in memory with nbclient and are never written back, so the files in git
keep their stripped form. Each tutorial opens with a code cell tagged ``parameters`` that assigns
``CARD = "..."``; ``--card NAME`` rewrites that assignment (in memory) before the run, which is
how CI runs every tutorial on a tiny model.

The kernel is always the interpreter running this script: a ``python3`` kernel spec pointing at
``sys.executable`` is written to a temporary folder and used instead of whatever ``python3``
spec the machine has installed (a stale user-level spec would otherwise win and run the notebooks
in another environment). A first, injected cell asserts that the kernel's ``sys.prefix`` is ours.

Exit status: 0 when every notebook ran (or, with ``--check-stripped``, is clean), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
KERNEL_NAME = "python3"
PARAMETERS_TAG = "parameters"
_CARD_LINE = re.compile(r"^(?P<lhs>\s*CARD\s*=\s*)(?P<rhs>.*?)(?P<comment>\s+#.*)?$", re.MULTILINE)


def _say(message: str = "") -> None:
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------ checks


def stripped_problems(nb) -> list[str]:
    """Reasons why ``nb`` is not in its committed form (outputs or execution counts left in)."""
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"cell {i} has {len(cell['outputs'])} output(s)")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {i} has execution_count {cell['execution_count']}")
    return problems


def check_stripped(paths: list[Path]) -> int:
    import nbformat

    bad = 0
    for path in paths:
        problems = stripped_problems(nbformat.read(path, as_version=4))
        if problems:
            bad += 1
            _say(f"NOT STRIPPED  {_rel(path)}: " + "; ".join(problems))
        else:
            _say(f"stripped      {_rel(path)}")
    if bad:
        _say(f"\n{bad} notebook(s) carry outputs. Clear them before committing, e.g. "
             "`jupyter nbconvert --clear-output --inplace notebooks/*.ipynb`.")
    return 1 if bad else 0


# ------------------------------------------------------------------------------ parameters


def set_card(nb, card: str) -> None:
    """Point the ``CARD = ...`` line of the ``parameters`` cell at ``card`` (in memory)."""
    cells = [c for c in nb.cells
             if c.cell_type == "code" and PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ValueError(f"no code cell is tagged {PARAMETERS_TAG!r}, so --card cannot be applied")
    cell = cells[0]
    source, n = _CARD_LINE.subn(
        lambda m: f"{m['lhs']}{json.dumps(card)}{m['comment'] or ''}", cell.source, count=1)
    if n == 0:
        raise ValueError(f"the {PARAMETERS_TAG!r} cell assigns no CARD, so --card cannot be applied")
    cell.source = source


# ------------------------------------------------------------------------------ execution


def _kernel_manager(spec_root: Path):
    """An async kernel manager whose ``python3`` kernel is this very interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    spec_dir = spec_root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python 3 ({sys.prefix})",
        "language": "python",
        "metadata": {"debugger": False},
    }, indent=1))
    ksm = KernelSpecManager(kernel_dirs=[str(spec_root / "kernels")], ensure_native_kernel=False)
    # Local IPC sockets in the temporary folder rather than TCP ports: nothing listens on the
    # network, and ipykernel has no reason to warn about unencrypted TCP.
    return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm, transport="ipc",
                              ip=str(spec_root / "kernel-ipc"))


def _interpreter_guard_cell():
    import nbformat

    return nbformat.v4.new_code_cell(
        "import sys as _run_notebooks_sys\n"
        f"assert _run_notebooks_sys.prefix == {sys.prefix!r}, (\n"
        "    f'kernel runs {_run_notebooks_sys.executable}, expected an interpreter in '\n"
        f"    {sys.prefix!r})\n"
        "del _run_notebooks_sys\n",
        metadata={"tags": ["injected-by-run_notebooks"]},
    )


def run_notebook(path: Path, card: str | None, timeout: int) -> tuple[bool, float, str]:
    """Execute one notebook in memory; return (ok, seconds, error message)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    if card is not None:
        try:
            set_card(nb, card)
        except ValueError as e:
            return False, 0.0, f"{_rel(path)}: {e}"
    nb.cells.insert(0, _interpreter_guard_cell())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="emi_kernel_") as tmp:
        client = NotebookClient(
            nb,
            km=_kernel_manager(Path(tmp)),
            kernel_name=KERNEL_NAME,
            timeout=timeout,
            allow_errors=False,
            record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        try:
            # We own the kernel manager, so ask nbclient to shut the kernel down afterwards
            # (it only does so by itself for managers it created).
            client.execute(cleanup_kc=True)
        except Exception as e:  # a cell error, a time-out, a dead or unstartable kernel
            return False, time.perf_counter() - start, f"{_rel(path)}: {type(e).__name__}\n{e}"
    return True, time.perf_counter() - start, ""


def run_all(paths: list[Path], card: str | None, timeout: int) -> int:
    # Children inherit these; they only silence noise (tokenizer fork warnings, debugpy notes).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    failures = []
    total = time.perf_counter()
    for path in paths:
        label = _rel(path) + (f" (CARD={card})" if card else "")
        _say(f"running  {label} ...")
        ok, seconds, message = run_notebook(path, card, timeout)
        _say(f"{'ok' if ok else 'FAILED':<8} {label} in {seconds:.1f} s")
        if not ok:
            failures.append(message)
    _say(f"\n{len(paths) - len(failures)}/{len(paths)} notebook(s) passed in "
         f"{time.perf_counter() - total:.1f} s")
    for message in failures:
        _say("\n" + "=" * 80 + "\n" + message)
    return 1 if failures else 0


# ------------------------------------------------------------------------------ CLI


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to run (default: every notebooks/*.ipynb)")
    parser.add_argument("--card", default=None,
                        help="card name to assign to CARD in each notebook's parameters cell")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell")
    parser.add_argument("--check-stripped", action="store_true",
                        help="only check that the notebooks have no outputs; run nothing")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    if not paths:
        _say(f"no notebooks found in {_rel(NOTEBOOK_DIR)}")
        return 1
    missing = [p for p in paths if not p.is_file()]
    if missing:
        _say("no such notebook: " + ", ".join(map(str, missing)))
        return 1
    if args.check_stripped:
        return check_stripped(paths)
    return run_all(paths, args.card, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
