"""Show a scored run: a terminal table, a JSON file, and a self-contained HTML page.

The HTML page embeds its charts as base64 PNGs, so it can be attached to a CI run or mailed
and still open on its own. matplotlib is imported only when a page is written.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from ops.evals.gate import Baseline, GateResult, compare
from schemas.evals import CaseOutcome, EvalReport, MetricValue

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OUTPUT_PREVIEW_CHARS = 160


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def _delta_pp(value: float | None, base: float | None) -> str:
    return "—" if value is None or base is None else f"{(value - base) * 100:+.1f}"


def _support(metric: MetricValue) -> str:
    return f"{metric.passed}/{metric.cases}"


def _baseline_value(baseline: Baseline | None, name: str) -> float | None:
    return None if baseline is None else baseline.metrics.get(name)


def latency_line(report: EvalReport) -> str:
    parts = [f"{k} {v:.2f}s" for k, v in report.latency_s.items()]
    return "latency: " + (", ".join(parts) if parts else "no outcomes")


def cost_line(report: EvalReport) -> str:
    c = report.cost
    return (f"cost: ${c.get('total_usd', 0.0):.4f} total, ${c.get('mean_usd', 0.0):.5f} a case; "
            f"tokens {c.get('prompt_tokens', 0)} prompt + {c.get('completion_tokens', 0)} completion")


def print_table(report: EvalReport, baseline: Baseline | None = None,
                console: Console | None = None) -> None:
    """Print the metrics (value, support, baseline, delta), then latency and cost."""
    console = console or Console()
    table = Table(title=f"eval {report.run_id} — {report.golden}")
    for column in ("metric", "value", "support", "baseline", "Δ pp"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, metric in report.metrics.items():
        base = _baseline_value(baseline, name)
        table.add_row(name, _pct(metric.value), _support(metric), _pct(base), _delta_pp(metric.value, base))
    console.print(table)
    console.print(latency_line(report))
    console.print(cost_line(report))


def write_json(report: EvalReport, path: str | Path) -> None:
    Path(path).write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")


# --- HTML -------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; padding: 0 1.5rem; max-width: 70rem;
       color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { border-bottom: 1px solid #ddd; padding: .3rem .7rem; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.regressed td, tr.changed td { background: #fde8e8; }
.verdict { font-weight: 600; } .verdict.failed { color: #b00020; } .verdict.passed { color: #1b7f3b; }
.output { font-family: ui-monospace, monospace; font-size: .85rem; white-space: pre-wrap; }
img { max-width: 100%; }
"""


def _figure_png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _new_figure(width_in: float, height_in: float) -> Figure:
    # A Figure on an Agg canvas rather than pyplot: no global backend switch, no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width_in, height_in))
    FigureCanvasAgg(fig)
    return fig


def _label_bars(ax: Any, rows: range, values: list[float | None], offset: float) -> None:
    for row, value in zip(rows, values, strict=True):
        text = "not measured" if value is None else f"{value * 100:.1f}%"
        ax.text((value or 0.0) * 100 + 1, row + offset, text, va="center", fontsize=8)


def metrics_chart_png(report: EvalReport, baseline: Baseline | None) -> str:
    """A horizontal bar per metric, labelled with its value, and the baseline's bar above it."""
    names = list(report.metrics)
    fig = _new_figure(8, 0.45 * len(names) + 1.2)
    ax = fig.add_subplot()
    rows = range(len(names))
    current = [report.metrics[n].value for n in names]
    ax.barh([r + 0.2 for r in rows], [(v or 0.0) * 100 for v in current], height=0.4,
            label="this run", color="#3b6ea8")
    _label_bars(ax, rows, current, 0.2)
    if baseline is not None:
        base = [(baseline.metrics.get(n) or 0.0) * 100 for n in names]
        ax.barh([r - 0.2 for r in rows], base, height=0.4, label="baseline", color="#bbbbbb")
    ax.set_yticks(list(rows), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 115)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("%")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    return _figure_png(fig)


def latency_chart_png(outcomes: list[CaseOutcome]) -> str:
    fig = _new_figure(8, 3)
    ax = fig.add_subplot()
    ax.hist([o.latency_s for o in outcomes], bins=min(30, max(1, len(outcomes))), color="#3b6ea8")
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("cases")
    return _figure_png(fig)


def _img(png_b64: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{png_b64}" alt="{html.escape(alt)}">'


def _table(headers: Iterable[str], rows: Iterable[str], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _cells(*values: str, numeric_from: int | None = None) -> str:
    """Table cells, escaped; those from index `numeric_from` on are right-aligned numbers."""
    def cell(i: int, v: str) -> str:
        cls = ' class="num"' if numeric_from is not None and i >= numeric_from else ""
        return f"<td{cls}>{html.escape(v)}</td>"
    return "".join(cell(i, v) for i, v in enumerate(values))


def _verdict_html(gate: GateResult | None) -> str:
    if gate is None:
        return "<p>no baseline given</p>"
    state = "passed" if gate.passed else "failed"
    lines = "".join(f"<li>{html.escape(line)}</li>" for line in gate.describe().splitlines()[1:])
    return (f'<p class="verdict {state}">gate against the baseline: {state}</p>'
            + (f"<ul>{lines}</ul>" if lines else ""))


def _versions_html(report: EvalReport, baseline: Baseline | None) -> str:
    old = baseline.versions if baseline is not None else {}
    rows = []
    for name in sorted(set(report.versions) | set(old)):
        now, was = report.versions.get(name, ""), old.get(name, "")
        cls = ' class="changed"' if baseline is not None and now != was else ""
        rows.append(f"<tr{cls}>{_cells(name, now, was if baseline is not None else '')}</tr>")
    return f"<h2>Versions</h2>{_table(['component', 'this run', 'baseline'], rows, 'versions')}"


def _header_html(report: EvalReport, baseline: Baseline | None, gate: GateResult | None) -> str:
    return (f"<h1>Sluice eval {html.escape(report.run_id)}</h1>"
            f"<p>golden: <code>{html.escape(report.golden)}</code> · started {html.escape(report.started_at)}"
            f" · {report.wall_s:.1f}s · {len(report.outcomes)} cases</p>"
            + _verdict_html(gate) + _versions_html(report, baseline))


def _metric_row(name: str, metric: MetricValue, baseline: Baseline | None, regressed: bool) -> str:
    base = _baseline_value(baseline, name)
    cls = ' class="regressed"' if regressed else ""
    cells = _cells(name, _pct(metric.value), _support(metric), _pct(base),
                   _delta_pp(metric.value, base), numeric_from=1)
    return f"<tr{cls}>{cells}</tr>"


def _metrics_html(report: EvalReport, baseline: Baseline | None, gate: GateResult | None) -> str:
    regressed = {r.metric for r in gate.regressions} if gate is not None else set()
    rows = [_metric_row(n, m, baseline, n in regressed) for n, m in report.metrics.items()]
    headers = ["metric", "value", "passed/measured", "baseline", "Δ pp"]
    return f"<h2>Metrics</h2>{_table(headers, rows, 'metrics')}"


def _failure_rows(report: EvalReport) -> list[str]:
    by_id = {o.case_id: o for o in report.outcomes}
    rows = []
    for name, metric in report.metrics.items():
        for case_id in metric.failures:
            outcome = by_id.get(case_id)
            status = outcome.status if outcome else "?"
            preview = outcome.output[:OUTPUT_PREVIEW_CHARS] if outcome else ""
            rows.append(f"<tr>{_cells(name, case_id, status)}"
                        f'<td class="output">{html.escape(preview)}</td></tr>')
    return rows


def _failures_html(report: EvalReport) -> str:
    rows = _failure_rows(report) or ['<tr><td colspan="4">no failing cases</td></tr>']
    return f"<h2>Failing cases</h2>{_table(['metric', 'case', 'status', 'output'], rows, 'failures')}"


def _charts_html(report: EvalReport, baseline: Baseline | None) -> str:
    alt = "bar chart of each metric in percent" + (" against the baseline" if baseline else "")
    parts = ["<h2>Metrics chart</h2>", _img(metrics_chart_png(report, baseline), alt),
             "<h2>Latency</h2>", f"<p>{html.escape(latency_line(report))}<br>"
             f"{html.escape(cost_line(report))}</p>"]
    if report.outcomes:
        parts.append(_img(latency_chart_png(report.outcomes), "histogram of case latency in seconds"))
    return "".join(parts)


def render_html(report: EvalReport, baseline: Baseline | None = None,
                default_tolerance_pp: float = 2.0) -> str:
    """The whole page as a string; with a baseline, the gate's verdict on the run."""
    gate = compare(report, baseline, default_tolerance_pp) if baseline is not None else None
    body = (_header_html(report, baseline, gate) + _metrics_html(report, baseline, gate)
            + _charts_html(report, baseline) + _failures_html(report))
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>Sluice eval {html.escape(report.run_id)}</title><style>{_CSS}</style></head>"
            f"<body>{body}</body></html>\n")


def write_html(report: EvalReport, path: str | Path, baseline: Baseline | None = None,
               default_tolerance_pp: float = 2.0) -> None:
    """Write a self-contained HTML page: gate verdict, versions, metrics, charts, failing cases."""
    Path(path).write_text(render_html(report, baseline, default_tolerance_pp), encoding="utf-8")
