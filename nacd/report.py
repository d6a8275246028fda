"""The run report: a score table per benchmark and a grouped bar plot, as HTML and Markdown.

Input is the ``scores.json`` files written by ``nacd.evaluation.run.evaluate`` (a list of rows
``{"target", "variant", "benchmark", "acc", "acc_norm", "n", ...}``). The HTML embeds the plot
as a base64 PNG so it is one self-contained file the KFP UI can render.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

VARIANT_ORDER = ("distilled", "less", "random", "full", "none")
REQUIRED = ("target", "variant", "benchmark", "acc")


class ReportError(ValueError):
    pass


@dataclass(frozen=True)
class ScoreRow:
    target: str
    variant: str
    benchmark: str
    acc: float
    acc_norm: float | None
    n: int | None
    limit: int | None

    @classmethod
    def parse(cls, row: dict, where: str) -> ScoreRow:
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ReportError(f"{where}: score row lacks {', '.join(missing)}")
        if row["acc"] is None:
            raise ReportError(f"{where}: 'acc' is null")
        return cls(str(row["target"]), str(row["variant"]), str(row["benchmark"]),
                   _number(row, "acc", where, float), _number(row, "acc_norm", where, float),
                   _number(row, "n", where, int), _number(row, "limit", where, int))


def _number(row: dict, key: str, where: str, kind: type) -> Any:
    """``row[key]`` as ``kind``; None where absent or null (only ``acc`` is required)."""
    value = row.get(key)
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (kind is int and value != int(value))):
        raise ReportError(f"{where}: '{key}' is not a{'n integer' if kind is int else ' number'}: {value!r}")
    return kind(value)


def read_scores(score_files: Iterable[str | os.PathLike]) -> list[ScoreRow]:
    rows: list[ScoreRow] = []
    for path in score_files:
        path = Path(path)
        if not path.is_file():
            raise ReportError(f"scores file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
        if not isinstance(data, list):
            raise ReportError(f"{path}: expected a list of score rows")
        rows.extend(ScoreRow.parse(r, f"{path}[{i}]") for i, r in enumerate(data))
    return rows


def _variant_key(variant: str) -> tuple[int, str]:
    return (VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER), variant)


def score_table(rows: Sequence[ScoreRow]) -> dict[str, tuple[list[str], list[str], dict]]:
    """Per benchmark: (targets, variants, {(target, variant): row})."""
    out: dict[str, tuple[list[str], list[str], dict]] = {}
    for bench in sorted({r.benchmark for r in rows}):
        sub = [r for r in rows if r.benchmark == bench]
        targets = sorted({r.target for r in sub})
        variants = sorted({r.variant for r in sub}, key=_variant_key)
        cells = {}
        for r in sub:
            if (r.target, r.variant) in cells:
                raise ReportError(f"two scores for {r.target} / {r.variant} / {bench}")
            cells[(r.target, r.variant)] = r
        out[bench] = (targets, variants, cells)
    return out


def format_table(rows: Sequence[ScoreRow]) -> str:
    """Plain-text table (what the CLI prints): one line per (benchmark, target)."""
    lines = []
    for bench, (targets, variants, cells) in score_table(rows).items():
        header = f"{bench:<10} {'target':<24}" + "".join(f"{v:>11}" for v in variants)
        lines += [header, "-" * len(header)]
        for t in targets:
            vals = "".join(f"{cells[(t, v)].acc:>11.4f}" if (t, v) in cells else f"{'-':>11}"
                           for v in variants)
            lines.append(f"{'':<10} {t:<24}" + vals)
    return "\n".join(lines)


def _markdown(rows: Sequence[ScoreRow]) -> str:
    parts = ["# nacd report", "", "Accuracy (acc; acc_norm in brackets) per target model and "
             "training-data variant.", ""]
    for bench, (targets, variants, cells) in score_table(rows).items():
        n = sorted({r.n for r in cells.values() if r.n is not None})
        parts += [f"## {bench}" + (f" (n = {', '.join(map(str, n))})" if n else ""), "",
                  "| target | " + " | ".join(variants) + " |",
                  "|---|" + "---:|" * len(variants)]
        for t in targets:
            vals = []
            for v in variants:
                r = cells.get((t, v))
                vals.append("-" if r is None else f"{r.acc:.4f}" +
                            (f" ({r.acc_norm:.4f})" if r.acc_norm is not None else ""))
            parts.append(f"| {t} | " + " | ".join(vals) + " |")
        parts.append("")
    return "\n".join(parts)


def _plot_png(rows: Sequence[ScoreRow]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # headless: pods and CI have no display
    import matplotlib.pyplot as plt

    table = score_table(rows)
    fig, axes = plt.subplots(1, max(1, len(table)), figsize=(5.5 * max(1, len(table)), 3.8),
                             squeeze=False)
    for ax, (bench, (targets, variants, cells)) in zip(axes[0], table.items()):
        width = 0.8 / max(1, len(variants))
        for j, v in enumerate(variants):
            xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(targets))]
            ys = [cells[(t, v)].acc if (t, v) in cells else 0.0 for t in targets]
            ax.bar(xs, ys, width, label=v)
        ax.set_xticks(range(len(targets)), targets, rotation=10)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.set_title(bench)
        ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _html(rows: Sequence[ScoreRow], png: bytes) -> str:
    e = html.escape
    body = ["<h1>nacd report</h1>",
            "<p>Accuracy (acc; acc_norm in brackets) per target model and training-data variant.</p>"]
    for bench, (targets, variants, cells) in score_table(rows).items():
        body.append(f"<h2>{e(bench)}</h2><table><tr><th>target</th>" +
                    "".join(f"<th>{e(v)}</th>" for v in variants) + "</tr>")
        for t in targets:
            tds = []
            for v in variants:
                r = cells.get((t, v))
                tds.append("<td>-</td>" if r is None else f"<td>{r.acc:.4f}" + (
                    f" ({r.acc_norm:.4f})" if r.acc_norm is not None else "") + "</td>")
            body.append(f"<tr><td>{e(t)}</td>{''.join(tds)}</tr>")
        body.append("</table>")
    body.append(f'<img alt="scores" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>nacd report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def write_report(score_files: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> str:
    """Write ``report.html``, ``report.md`` and ``scores.png`` into ``out_dir``; return the HTML path.

    Files are written to a temporary sibling folder first and moved into place, so a failure
    leaves no partial report."""
    rows = read_scores(score_files)
    if not rows:
        raise ReportError("no score rows to report (every evaluation was skipped or empty)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = _plot_png(rows)
    with tempfile.TemporaryDirectory(prefix=".report-", dir=out) as tmp:
        t = Path(tmp)
        (t / "scores.png").write_bytes(png)
        (t / "report.md").write_text(_markdown(rows))
        (t / "report.html").write_text(_html(rows, png))
        (t / "scores.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2))
        for name in ("scores.png", "report.md", "scores.json", "report.html"):  # html last
            os.replace(t / name, out / name)
    return str(out / "report.html")
