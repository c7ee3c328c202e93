"""Execute a notebook's code cells in order in one namespace (nbclient is not a dependency).

``python -m tests.integration.run_notebook NOTEBOOK`` exits 1 naming the failing cell. A fresh
process, so the notebook's first cell imports FiftyOne before anything imports MLflow.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def run(path: Path) -> int:
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    namespace: dict = {"__name__": "__main__"}
    for number, cell in enumerate(cells, start=1):
        source = "".join(cell["source"])
        try:
            exec(compile(source, f"{path.name}[code cell {number}]", "exec"), namespace)  # noqa: S102
        except Exception:
            traceback.print_exc()
            print(f"FAILED: code cell {number} of {len(cells)}", file=sys.stderr)
            return 1
    print(f"OK: {len(cells)} code cells")
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
