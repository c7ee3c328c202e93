"""Execute a notebook in a fresh Jupyter kernel (nbclient) and check it against its committed outputs.

``python -m tests.integration.run_notebook NOTEBOOK`` executes a copy of NOTEBOOK top to bottom (the
kernel inherits this process's environment, e.g. ``DETLOOP_NOTEBOOK_OVERRIDES``), prints each code
cell's text output, and exits 1 naming the cell when

* a cell raises or any output is an error;
* the committed notebook drifted from its code: it was not executed top to bottom in one run, or a
  cell's source changed after it was executed (the source hash stored in ``metadata.detloop``);
* a cell now shows other kinds of output (text, table, image) than the committed one.

Values are not compared (the tests run at tiny size, the committed outputs are the demo's).
It ends with ``OK: N code cells``.

``python -m tests.integration.run_notebook NOTEBOOK --write`` executes NOTEBOOK and stores its outputs
in it, with each cell's source hash (see notebooks/README.md: run it on the demo data).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

CELL_TIMEOUT_S = 1800  # the demo's fine-tune (10 epochs) runs in one cell
KINDS = {"text/html": "table", "image/png": "image"}


def source_hash(cell) -> str:
    return hashlib.sha256(cell.source.encode("utf-8")).hexdigest()[:16]


def output_kinds(cell) -> list[str]:
    """What a code cell shows: printed ``text``, a ``table`` (HTML), an ``image`` (PNG); stderr is not counted."""
    kinds = set()
    for output in cell.get("outputs", []):
        if output.output_type == "stream" and output.name == "stdout":
            kinds.add("text")
        elif output.output_type in ("display_data", "execute_result"):
            kinds |= {KINDS[mime] for mime in output.get("data", {}) if mime in KINDS}
    return sorted(kinds)


def errors(nb) -> list[str]:
    return [
        f"code cell {number}: {output.get('ename')}: {output.get('evalue')}"
        for number, cell in enumerate(code_cells(nb), start=1)
        for output in cell.get("outputs", [])
        if output.output_type == "error"
    ]


def code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def execute(path: Path):
    """The notebook at ``path`` executed in a fresh kernel (working directory: the current one)."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False, resources={"metadata": {"path": "."}}
    )
    client.execute()
    return nb


def drift(committed, executed) -> list[str]:
    """How the committed notebook differs from its re-execution (beyond the values shown)."""
    problems = []
    cells = code_cells(committed)
    counts = [cell.get("execution_count") for cell in cells]
    if counts != list(range(1, len(cells) + 1)):
        problems.append(f"not executed top to bottom in one run (execution counts {counts})")
    for number, (old, new) in enumerate(zip(cells, code_cells(executed), strict=True), start=1):
        stored = old.metadata.get("detloop", {}).get("source_sha256")
        if stored != source_hash(old):
            problems.append(f"code cell {number}: its source changed after the committed outputs were made")
        if output_kinds(old) != output_kinds(new):
            problems.append(f"code cell {number}: committed outputs {output_kinds(old)}, now {output_kinds(new)}")
    return problems + [f"committed {problem}" for problem in errors(committed)]


def write(path: Path, executed) -> None:
    for cell in code_cells(executed):
        cell.metadata["detloop"] = {"source_sha256": source_hash(cell)}
    nbformat.write(executed, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--write", action="store_true", help="store the executed outputs in NOTEBOOK")
    args = parser.parse_args(argv)
    try:
        executed = execute(args.notebook)
    except CellExecutionError as err:
        print(err, file=sys.stderr)
        print("FAILED: a code cell raised", file=sys.stderr)
        return 1
    for number, cell in enumerate(code_cells(executed), start=1):
        text = "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")
        print(f"--- code cell {number}: {', '.join(output_kinds(cell)) or 'no output'}\n{text}", end="")
    problems = errors(executed)
    if args.write and not problems:
        write(args.notebook, executed)
        print(f"\nwrote {args.notebook}")
    elif not args.write:
        problems += drift(nbformat.read(args.notebook, as_version=4), executed)
    if problems:
        print("FAILED:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 1
    print(f"\nOK: {len(code_cells(executed))} code cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
