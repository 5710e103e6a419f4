"""`sluice eval`, `sluice baseline update` and `sluice versions`: behaviour measured on golden
sets, gated against a baseline, and compared across the version tuples that served traffic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ops.cli_support import console, fail, out, prepared_settings, ready_settings, writable_folder

baseline_app = typer.Typer(help="Evaluation baselines.", no_args_is_help=True)


def evaluate(
    golden_file: Annotated[Path, typer.Argument(help="golden cases, JSONL")],
    corpus: Annotated[Path | None, typer.Option(
        help="a corpus folder <tenant>/<acl>/<files> to ingest and index first")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="only cases with this tag (e.g. ci)")] = None,
    baseline: Annotated[Path | None, typer.Option(help="gate against this baseline file")] = None,
    tolerance_pp: Annotated[float, typer.Option(
        help="default tolerance, percentage points, for metrics without their own")] = 2.0,
    out_dir: Annotated[Path, typer.Option("--out", help="report folder")] = Path("sluice-eval"),
    workers: Annotated[bool | None, typer.Option(
        help="start one worker per queue (default: only in the embedded mode)")] = None,
    timeout_s: Annotated[float | None, typer.Option(help="give up waiting after this")] = None,
) -> None:
    """Run golden cases through the real pipeline and measure them.

    Prints the metrics, saves them (JSON, HTML) and records the run in the store; with
    --baseline, exits 1 when a metric drops beyond its tolerance."""
    from ops.corpus import CorpusError, build_index, ingest_tree
    from ops.embedded import WorkerDied
    from ops.evals import gate, report
    from ops.evals.runner import (
        GoldenSetError,
        build_report,
        load_golden,
        prepare_corpus,
        read_outcomes,
        record_run,
        resolved,
        run_cases,
        served_versions,
    )

    writable_folder(out_dir, "the report")
    settings = prepared_settings()
    try:
        golden = load_golden(golden_file, tag)
        reference = gate.load_baseline(baseline) if baseline else None
    except (GoldenSetError, OSError, ValueError) as exc:
        fail(str(exc))
    if corpus is not None:
        try:
            ingest_tree(settings, corpus)
            build_index(settings)
        except CorpusError as exc:
            fail(str(exc))
    elif prepare_corpus(settings, golden):
        console.print("ingested the corpus and built its index")
    spawn = settings.embedded if workers is None else workers
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task(f"{len(golden.cases)} cases", total=len(golden.cases))
            job_id, wall_s = run_cases(settings, golden, spawn,
                                       lambda d, t: progress.update(task, completed=d, total=t),
                                       timeout_s)
    except (WorkerDied, TimeoutError) as exc:
        fail(str(exc))
    cases = [resolved(c) for c in golden.cases]
    result = build_report(golden, cases, read_outcomes(settings, job_id, cases),
                          served_versions(settings, job_id), wall_s)
    verdict = gate.compare(result, reference, tolerance_pp) if reference else None
    record_run(settings, result, job_id, None if verdict is None else
               ("passed" if verdict.passed else "failed"))
    report.print_table(result, reference, out)
    report.write_json(result, out_dir / "report.json")
    report.write_html(result, out_dir / "report.html", reference, tolerance_pp)
    console.print(f"run {result.run_id} (job {job_id}): wrote {out_dir / 'report.json'} and "
                  f"{out_dir / 'report.html'}")
    if verdict is not None:
        out.print(verdict.describe())
        if not verdict.passed:
            raise typer.Exit(1)


@baseline_app.command("update")
def baseline_update(
    report_file: Annotated[Path, typer.Argument(help="an eval run's report.json")],
    baseline: Annotated[Path, typer.Option(help="the baseline file to write")],
    by: Annotated[str, typer.Option(help="who changes the baseline")],
    reason: Annotated[str, typer.Option(help="why it changes")],
    tolerance: Annotated[list[str] | None, typer.Option(
        help="METRIC=PP, a metric's own tolerance in percentage points (repeatable); "
             "tolerances already in the baseline file are kept unless given again")] = None,
) -> None:
    """Make an eval run the baseline, recording who changed it and why."""
    from ops.evals import gate
    from schemas.evals import EvalReport

    if not report_file.is_file():
        fail(f"no report at {report_file}: `sluice eval GOLDEN --out DIR` writes DIR/report.json")
    try:
        result = EvalReport.model_validate_json(report_file.read_text(encoding="utf-8"))
        kept = gate.load_baseline(baseline).tolerances_pp if baseline.exists() else {}
        gate.write_baseline(result, baseline, by, reason, {**kept, **_tolerances(tolerance)})
    except (OSError, ValueError) as exc:
        fail(str(exc))
    out.print(f"baseline {baseline} is now run {result.run_id} ({result.golden}), by {by}: "
              f"{reason}")


def _tolerances(pairs: list[str] | None) -> dict[str, float]:
    tolerances = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"a tolerance is METRIC=PP, got {pair!r}")
        tolerances[name.strip()] = float(value)
    return tolerances


def versions(
    since_h: Annotated[float, typer.Option(help="the window: the last this many hours")] = 24.0,
) -> None:
    """The version tuples that served requests in a window, and their eval runs.

    Each tuple with its requests' outcomes, and the eval runs recorded for it."""
    from ops.evals.versions import eval_runs_by_tuple, traffic_by_tuple

    settings = ready_settings()
    since = datetime.now(UTC) - timedelta(hours=since_h)
    traffic = traffic_by_tuple(settings, since)
    evals = eval_runs_by_tuple(settings)
    if not traffic:
        out.print(f"no requests in the last {since_h:g} h")
        return
    for rank, row in enumerate(traffic, start=1):
        table = Table(title=f"tuple {rank}: {row.requests} request(s), {row.first:%Y-%m-%d %H:%M}"
                            f" .. {row.last:%Y-%m-%d %H:%M} UTC")
        table.add_column("component")
        table.add_column("version")
        for name, value in row.versions.items():
            changed = rank > 1 and traffic[0].versions.get(name) != value
            table.add_row(name, f"[yellow]{value}[/yellow]" if changed else value)
        out.print(table)
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(row.statuses.items()))
        out.print(f"  outcomes: {statuses}; succeeded {row.success_rate:.0%}; "
                  f"latency p50 {row.p50_s:.2f}s; tokens/request {row.tokens_per_request:.0f}")
        for run in evals.get(row.key, []):
            shown = ", ".join(f"{k} {v:.0%}" for k, v in sorted(run.metrics.items())
                              if v is not None)
            out.print(f"  eval {run.id} ({run.golden}, gate {run.gate or 'n/a'}): {shown}")
