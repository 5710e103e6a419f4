"""`sluice`: run jobs, serve queues, and operate the audit store."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from ops import eval_cli
from ops.cli_support import (
    console,
    fail,
    load_settings,
    out,
    prepared_settings,
    ready_settings,
    writable_folder,
)
from ops.router_cli import router_app
from ops.validators_cli import validators_app
from schemas.status import Lane, Stage
from workers.settings import Settings

app = typer.Typer(help="Sluice: a governed generation pipeline.", no_args_is_help=True)
db_app = typer.Typer(help="The audit store's schema.", no_args_is_help=True)
models_app = typer.Typer(help="Model files.", no_args_is_help=True)
index_app = typer.Typer(help="Retrieval indexes.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
app.add_typer(index_app, name="index")
app.add_typer(router_app, name="router")
app.add_typer(validators_app, name="validators")
app.add_typer(eval_cli.baseline_app, name="baseline")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the audit store to the newest schema."""
    from workers.store.migrate import url_for_messages

    console.print(f"audit store at head: {url_for_messages(prepared_settings().database_url)}")


@models_app.command("prepare")
def models_prepare() -> None:
    """Convert the packaged SmolLM2 GGUF into a cached safetensors folder (once)."""
    from ops.models import prepare_default_model

    settings = load_settings()
    target = Path(settings.generator_model)
    converted = prepare_default_model(target)
    console.print(f"{'converted' if converted else 'already prepared'}: {target}")


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="files and folders (searched recursively)")],
    tenant: Annotated[str | None, typer.Option(
        help="the tenant that owns these files; without it, each PATH is a tree "
             "<tenant>/<acl label>/<files> (the example corpus layout)")] = None,
    acl: Annotated[str, typer.Option(
        help="comma-separated ACL labels: a request sees a chunk only if it holds all "
             "of them as grants")] = "public",
    prune: Annotated[bool, typer.Option(
        help="retire documents an ingested folder held before and no longer does")] = False,
) -> None:
    """Ingest Markdown, text and HTML files into the audit store; then `sluice index build`.

    Re-ingesting replaces only files whose content or ACL changed. Bad files (unreadable,
    empty, not UTF-8, unsupported type) are reported by name and skipped. Every PATH must
    exist: a mistyped one ingests nothing and exits 1.
    """
    from ops.corpus import CorpusError, ingest_paths, ingest_tree

    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        fail(f"not found: {', '.join(missing)}; nothing ingested")
    settings = prepared_settings()
    labels = [label.strip() for label in acl.split(",") if label.strip()]
    try:
        with _progress() as progress:
            task = progress.add_task("ingesting files", total=None)

            def tick(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            if tenant is None:
                reports = [ingest_tree(settings, root, prune=prune, progress=tick) for root in paths]
            else:
                reports = [ingest_paths(settings, paths, tenant, labels, prune=prune,
                                        progress=tick)]
    except CorpusError as exc:
        fail(str(exc))
    skipped = [item for report in reports for item in report.skipped]
    for path, reason in skipped:
        # soft_wrap: a long path stays on one line, whole, whatever the terminal's width
        console.print(f"[yellow]skipped[/yellow] {escape(str(path))}: {escape(reason)}",
                      soft_wrap=True)
    totals = {name: sum(getattr(r, name) for r in reports)
              for name in ("added", "updated", "unchanged", "restored", "retired", "chunks")}
    console.print("documents: " + ", ".join(f"{n} {name}" for name, n in totals.items()
                                            if name != "chunks")
                  + f", {len(skipped)} skipped; {totals['chunks']} chunks written")
    if any(r.changed for r in reports):
        console.print("the corpus changed: run `sluice index build` to serve it")


@app.command("seed-records")
def seed_records(corpus: Annotated[Path | None, typer.Argument(
        help="a <tenant>/engineering/inc-*.md tree; default: the example corpus")] = None) -> None:
    """Load incident tickets into the system of record that the lookup tools read."""
    from ops.corpus import seed_example_records

    inserted = seed_example_records(prepared_settings(), corpus)
    console.print(f"{inserted} ticket(s) added to the system of record")


@index_app.command("build")
def index_build() -> None:
    """Embed the live chunks and activate the index named by their content hash."""
    from ops.corpus import CorpusError, build_index

    settings = prepared_settings()
    try:
        with _progress() as progress:
            task = progress.add_task("embedding chunks", total=None)
            index_id, built = build_index(
                settings, lambda done, total: progress.update(task, completed=done, total=total))
    except CorpusError as exc:
        fail(str(exc))
    console.print(f"{'built' if built else 'reactivated'} and activated {index_id}")


@index_app.command("list")
def index_list() -> None:
    """Every index built, its kind and size, and which one is active."""
    from ops.corpus import list_indexes

    rows = list_indexes(prepared_settings())
    # The id stays whole however narrow the terminal: it is what `index activate` takes.
    table = Table(Column("id", no_wrap=True, min_width=max((len(r.id) for r in rows), default=2)),
                  "kind", "chunks", "embedder", "created", "active", "files")
    for row in rows:
        table.add_row(row.id, row.kind, str(row.chunks), row.embedder, row.created_at,
                      "*" if row.active else "", "ok" if row.on_disk else "[red]missing[/red]")
    out.print(table)


@index_app.command("activate")
def index_activate(index_id: Annotated[str, typer.Argument(help="an index id or unique prefix")]) -> None:
    """Serve this index from now on; retrieval workers pick it up without a restart."""
    from ops.corpus import CorpusError, activate_index

    try:
        previous = activate_index(prepared_settings(), index_id)
    except CorpusError as exc:
        fail(str(exc))
    console.print(f"activated {index_id} (was {previous or 'none'})")


@index_app.command("rollback")
def index_rollback() -> None:
    """Re-activate the index that the active one replaced."""
    from ops.corpus import CorpusError, rollback_index

    try:
        current, previous = rollback_index(prepared_settings())
    except CorpusError as exc:
        fail(str(exc))
    console.print(f"rolled back from {current} to {previous}")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console)


@app.command()
def run(
    job_file: Annotated[Path, typer.Argument(help="JSONL file, one request per line")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="where results go")] = None,
    workers: Annotated[bool | None, typer.Option(help="start one worker per queue (default: "
                                                       "only in the embedded mode)")] = None,
    timeout_s: Annotated[float | None, typer.Option(help="give up waiting after this")] = None,
) -> None:
    """Run a job file to the end and write results.jsonl and errors.jsonl.

    Re-running the same file resumes it: requests already terminal are not redone."""
    from ops.corpus import ensure_example_index
    from ops.embedded import WorkerDied
    from ops.jobs import execute_job

    _check_job_file(job_file)
    target = writable_folder(out_dir or Path("sluice-out") / job_file.stem, "results")
    settings = prepared_settings()
    spawn = settings.embedded if workers is None else workers
    if settings.embedded and ensure_example_index(settings):
        console.print("ingested the example corpus and built its index")
    try:
        with _progress() as progress:
            task = progress.add_task("requests", total=None)
            admitted, done = execute_job(
                settings, job_file, spawn,
                lambda d, t: progress.update(task, completed=d, total=t), timeout_s,
                on_admitted=lambda a: console.print(
                    f"job {a.job_id}: {'admitted' if a.created else 'resumed'}, "
                    f"{len(a.dispatches)} shard(s) enqueued, {len(a.malformed)} malformed "
                    "line(s)"))
    except WorkerDied as exc:
        fail(f"{exc}; run the same command again to resume")
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to resume", 130)
    from ops.jobs import export_job

    try:
        results, errors = export_job(settings, admitted.job_id, target)
    except OSError as exc:
        fail(f"cannot write results to {target}: {exc.strerror or exc}; the job is done: "
             f"`sluice results {admitted.job_id} --out DIR` writes them")
    _print_summary(settings, admitted.job_id)
    console.print(f"wrote {results} and {errors}")
    if not done:
        fail("timed out before every request was terminal; run the same command to resume")


def _check_job_file(job_file: Path) -> None:
    """Exit 1 with one line unless `job_file` is a file with something in it: a run of
    nothing would start every worker to say nothing."""
    if job_file.is_dir():
        fail(f"a folder, not a job file: {job_file}")
    if not job_file.is_file():
        fail(f"job file not found: {job_file}")
    with job_file.open("rb") as lines:
        if not any(line.strip() for line in lines):
            fail(f"the job file has no lines: {job_file}")


def _print_summary(settings: Settings, job_id: str) -> None:
    from ops.jobs import summarize

    summary = summarize(settings, job_id)
    table = Table(title=f"job {job_id}")
    table.add_column("status")
    table.add_column("requests", justify="right")
    for status, count in sorted(summary.counts.items()):
        table.add_row(status, str(count))
    table.add_row("malformed lines", str(summary.malformed))
    console.print(table)
    latency = ", ".join(f"{k} {v:.2f}s" for k, v in summary.latency_s.items()) or "n/a"
    console.print(f"latency: {latency}")
    console.print(f"tokens: prompt {summary.prompt_tokens}, completion {summary.completion_tokens}")
    gen = summary.generation
    if gen.calls:
        mean_batch = sum(gen.batch_sizes) / len(gen.batch_sizes)
        console.print(f"generation: {gen.calls} model call(s), {gen.compute_s:.2f} device-s, "
                      f"mean batch {mean_batch:.1f}, mean queue wait "
                      f"{gen.queue_wait_s / gen.calls:.2f}s, cost ${gen.cost_usd:.6f} "
                      f"(at SLUICE_ACCELERATOR_HOUR_USD={settings.accelerator_hour_usd})")


@app.command()
def submit(job_file: Annotated[Path, typer.Argument(help="JSONL file")],
           lane: Annotated[Lane, typer.Option(help="queue lane")] = Lane.BATCH) -> None:
    """Admit a job file and enqueue it for running workers; prints the job id."""
    from ops.jobs import submit_job

    _check_job_file(job_file)
    admitted = submit_job(prepared_settings(), job_file, lane)
    out.print(admitted.job_id)


@app.command()
def status(job_id: str) -> None:
    """Counts of a job's requests by status, and of its malformed lines."""
    from workers.store.admission import job_counts
    from workers.store.engine import session_scope
    from workers.store.models import Job

    with session_scope(ready_settings().database_url) as session:
        job = session.get(Job, job_id)
        if job is None:
            fail(f"no job with id {job_id!r}")
        counts = job_counts(session, job_id)
        malformed = len(job.malformed or [])
    out.print_json(json.dumps(counts | ({"malformed": malformed} if malformed else {})))


@app.command()
def results(job_id: str, out_dir: Annotated[Path, typer.Option("--out")] = Path("sluice-out")) -> None:
    """Write a job's results.jsonl and errors.jsonl as they stand now."""
    from ops.jobs import export_job

    try:
        paths = export_job(ready_settings(), job_id, writable_folder(out_dir / job_id,
                                                                     "results"))
    except ValueError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write results to {out_dir / job_id}: {exc.strerror or exc}")
    out.print(f"wrote {paths[0]} and {paths[1]}")


@app.command()
def cancel(job_id: str) -> None:
    """Stop a job's remaining work; its unfinished requests end as failed/Cancelled."""
    from workers.store.admission import AdmissionError
    from workers.store.engine import session_scope
    from workers.store.operators import cancel_job

    try:
        with session_scope(ready_settings().database_url) as session:
            count = cancel_job(session, job_id)
    except AdmissionError as exc:
        fail(str(exc))
    out.print(f"cancelled {count} unfinished request(s) of {job_id}")


@app.command()
def worker(queue: Annotated[Stage, typer.Option(help="the stage whose queues to serve")],
           concurrency: Annotated[int, typer.Option(
               help="worker processes; the generation worker's threads come from "
                    "SLUICE_GENERATION_CONCURRENCY")] = 1) -> None:
    """Serve one stage's online and batch queues (online first)."""
    from ops.embedded import celery_worker_command, worker_env

    settings = ready_settings()
    os.environ.update(worker_env(settings))
    argv = celery_worker_command(settings, queue, concurrency, f"{queue.value}@%h")
    os.execv(argv[0], argv)


@app.command()
def reconcile(once: bool = False) -> None:
    """Re-drive shards whose lease expired or that stalled (runs until stopped)."""
    from workers.reconciler import ReconcilerThread, reconcile_once

    settings = ready_settings()
    if once:
        out.print(f"re-drove {len(reconcile_once(settings))} shard stage(s)")
        return
    thread = ReconcilerThread(settings)
    thread.start()
    thread.join()


@app.command()
def failed(job: Annotated[str | None, typer.Option(help="only this job")] = None,
           limit: Annotated[int, typer.Option(help="at most this many, latest first")] = 100,
           as_json: Annotated[bool, typer.Option("--json", help="one JSON list")] = False) -> None:
    """List failed requests, latest first: ids, failing stage, error class and message.

    Two lines a request rather than a table, so that ids stay whole (to pass to `sluice
    audit` and `sluice replay`) whatever the terminal's width."""
    from workers.store.engine import session_scope
    from workers.store.operators import failed_requests

    with session_scope(ready_settings().database_url) as session:
        rows = [{"request_id": r.id, "custom_id": r.custom_id, "job_id": r.job_id,
                 "stage": r.error_stage, "error_class": r.error_class, "message": r.error_message}
                for r in failed_requests(session, job, limit)]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    console.print(f"{len(rows)} failed request(s)" + (f" of {escape(job)}" if job else "")
                  + (f" (the latest {limit})" if len(rows) == limit else ""))
    for row in rows:
        ids = "  ".join(str(row[k]) for k in ("request_id", "custom_id", "job_id") if row[k])
        out.print(escape(ids), soft_wrap=True, highlight=False)
        message = textwrap.shorten(row["message"] or "", 200, placeholder=" …")
        out.print(f"  {escape(row['stage'] or '-')} [bold]{escape(row['error_class'] or '-')}"
                  f"[/bold]: {escape(message)}", soft_wrap=True, highlight=False)


@app.command()
def audit(request_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """A request's trail: stages, versions, chunks read, tokens, verdicts."""
    from workers.store.admission import AdmissionError
    from workers.store.engine import session_scope
    from workers.store.operators import audit_trail

    try:
        with session_scope(ready_settings().database_url) as session:
            trail = _trail_json(audit_trail(session, request_id))
    except AdmissionError as exc:
        fail(str(exc))
    if as_json:
        out.print_json(json.dumps(trail, default=str))
        return
    _print_trail(trail)


def _trail_json(trail: dict[str, Any]) -> dict[str, Any]:
    r = trail["request"]
    return {
        "request": {"id": r.id, "custom_id": r.custom_id, "tenant": r.tenant_id,
                    "status": r.status, "run": r.run, "error_class": r.error_class,
                    "error_stage": r.error_stage, "error_message": r.error_message,
                    "output": r.output, "citations": r.citations,
                    "tokens": {"prompt": r.prompt_tokens, "completion": r.completion_tokens},
                    "drift_policy": r.drift_policy, "pinned_versions_id": r.pinned_versions_id,
                    "pinned_versions": trail["pinned_versions"]},
        "stage_runs": [{"stage": s.stage, "run": s.run, "round": s.round, "status": s.status,
                        "deliveries": s.deliveries, "outcome": s.outcome_status,
                        "error_class": s.error_class, "duration_s": s.duration_s,
                        "served_versions": trail["tuples"].get(
                            s.served_versions_id or "")} for s in trail["stage_runs"]]
        + [{"stage": s.stage, "run": s.run, "round": s.round, "status": s.status,
            "deliveries": s.deliveries, "outcome": None, "error_class": None,
            "duration_s": None, "served_versions": None} for s in trail["waiting"]],
        "events": [{"stage": e.stage, "run": e.run, "kind": e.kind, "payload": e.payload,
                    "at": str(e.created_at)} for e in trail["events"]],
        # What an event names by id (the pin at admission, at each replay).
        "version_tuples": trail["tuples"],
    }


def _print_trail(trail: dict[str, Any]) -> None:
    r = trail["request"]
    out.print(f"[bold]{r['id']}[/bold] ({r['custom_id']}, tenant {r['tenant']}): "
              f"{r['status']} run {r['run']}")
    if r["error_class"]:
        out.print(f"  failed at {r['error_stage']}: {r['error_class']}: {r['error_message']}")
    out.print(f"  pinned: {r['pinned_versions']}")
    table = Table("run", "stage", "status", "outcome", "deliveries", "seconds")
    for s in trail["stage_runs"]:
        table.add_row(str(s["run"]), s["stage"], s["status"], s["outcome"] or "-",
                      str(s["deliveries"]), f"{s['duration_s'] or 0:.3f}")
    out.print(table)
    events = Table("run", "stage", "event", "detail")
    for e in trail["events"]:
        events.add_row(str(e["run"]), e["stage"] or "-", e["kind"],
                       json.dumps(e["payload"], default=str)[:160])
    out.print(events)


@app.command()
def replay(request_id: str,
           from_stage: Annotated[Stage, typer.Option("--from", help="stage to restart at")] = Stage.ROUTER,
           follow_current_versions: bool = False,
           wait: Annotated[bool, typer.Option(help="wait for the replay to finish")] = False,
           timeout_s: float = 600) -> None:
    """Run a request again from a stage, strict on its pinned versions unless told to follow."""
    from workers.dispatch import enqueue
    from workers.runtime import pinned_versions_now
    from workers.store.admission import AdmissionError
    from workers.store.engine import session_scope
    from workers.store.operators import replay as replay_request

    settings = ready_settings()
    try:
        with session_scope(settings.database_url) as session:
            dispatch = replay_request(session, request_id, from_stage,
                                      pinned_versions_now(settings), follow_current_versions)
    except AdmissionError as exc:
        fail(str(exc))
    enqueue(dispatch, settings)
    out.print(f"replaying {request_id} from {from_stage.value} as run {dispatch.hop.run}")
    if wait:
        from ops.client import SluiceClient

        result = SluiceClient(settings).wait(request_id, timeout_s=timeout_s)
        out.print_json(json.dumps(result))


# Registered last, so that `sluice --help` lists the job and operator commands first.
app.command(name="eval")(eval_cli.evaluate)
app.command(name="versions")(eval_cli.versions)

if __name__ == "__main__":
    app()
