"""The one table `make bench` ends with: every benchmark's headline figures beside their anchors and targets.

Each benchmark prints its own table; the figures that answer "is pbx good
enough?" are spread over six of them. So at the end of its main each benchmark
calls ``record`` once per headline figure, with what it already computed:

    from bench.summary import record

    record("bridge", "CPU s/call, 50 calls", pbx=0.0123, anchor=0.0150, ratio=0.82, target="<= 1.0", met=True)

- ``benchmark``: the script's name without .py ("bridge", "ivr", ...).
- ``figure``: what is measured, with its unit and the load it was measured at.
- ``pbx``: the PBX's figure; None when it was not measured (the run failed).
- ``anchor``: the same figure of what pbx is held against, measured in the
  same run of the script (pjsua2, Kamailio, the same calls unrecorded, ...);
  None when there is none.
- ``ratio``: pbx / anchor as the script computes it; None when there is none.
- ``target``: the target as text ("<= 1.0", "< 200 ms"); "-" when there is none.
- ``met``: whether the target is met; None when there is no target or the
  figure was not measured.

``record`` appends one JSON line to the file the environment variable
BENCH_SUMMARY names and does nothing when it is unset, so a benchmark run by
hand writes nothing. `make bench` points it at a fresh file and afterwards runs

    .venv/bin/python bench/summary.py FILE

which prints the rows of FILE as one aligned table and, last, how many targets
are met. It exits 0 whatever the figures: each benchmark's own exit status
says whether it passed.
"""

from __future__ import annotations

if __name__ == "__main__":
    import script_path  # noqa: F401  (run as a script: the repository's root on the import path)

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from bench.measure import aligned

ENV = "BENCH_SUMMARY"
FIELDS = ("benchmark", "figure", "pbx", "anchor", "ratio", "target", "met")


def record(benchmark: str, figure: str, pbx: float | None, anchor: float | None, ratio: float | None, target: str, met: bool | None) -> None:
    """Append one row to the summary file named by $BENCH_SUMMARY, if set."""
    path = os.environ.get(ENV)
    if not path:
        return
    # NaN and infinity are no JSON: a figure that is not finite was not measured.
    pbx, anchor, ratio = (v if v is not None and math.isfinite(v) else None for v in (pbx, anchor, ratio))
    row = dict(zip(FIELDS, (benchmark, figure, pbx, anchor, ratio, target, met), strict=True))
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def figure_text(value: Any) -> str:
    """A figure with four significant digits and no exponent; "n/a" when not measured."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    decimals = max(0, 3 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def met_text(met: Any) -> str:
    return "yes" if met is True else "NO" if met is False else "-"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a summary file, in the order written; lines that are no
    JSON object (a benchmark killed mid-write) are skipped with a warning."""
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            print(f"{path}:{number}: not a summary row, skipped", file=sys.stderr)
            continue
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    cells = [["benchmark", "figure", "pbx", "anchor", "ratio", "target", "met"]]
    for row in rows:
        ratio = row.get("ratio")
        cells.append(
            [
                str(row.get("benchmark", "?")),
                str(row.get("figure", "?")),
                figure_text(row.get("pbx")),
                figure_text(row.get("anchor")) if row.get("anchor") is not None else "-",
                f"{ratio:.2f}" if isinstance(ratio, int | float) and math.isfinite(ratio) else "-",
                str(row.get("target") or "-"),
                met_text(row.get("met")),
            ]
        )
    # Names read better left-aligned; ``aligned`` right-aligns, so pad them first.
    for column in (0, 1):
        width = max(len(line[column]) for line in cells)
        for line in cells:
            line[column] = line[column].ljust(width)
    return aligned(cells)


def verdict(rows: list[dict[str, Any]]) -> str:
    """The last line: targets met of those with a target."""
    judged = [row["met"] for row in rows if isinstance(row.get("met"), bool)]
    missed = sum(1 for row in rows if row.get("target") not in (None, "", "-") and not isinstance(row.get("met"), bool))
    text = f"{sum(judged)} of {len(judged)} targets met"
    if missed:
        text += f" ({missed} more not measured)"
    return text + f"; figures without a target: {len(rows) - len(judged) - missed}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: {Path(sys.argv[0]).name} SUMMARY.jsonl", file=sys.stderr)
        return 2
    path = Path(argv[0])
    rows = read_rows(path) if path.exists() else []
    print()
    if not rows:
        print(f"benchmark summary: no figures recorded in {path}")
        return 0
    print("benchmark summary (pbx beside its anchor of the same run; ratio = pbx / anchor):")
    print(table(rows))
    print(verdict(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
