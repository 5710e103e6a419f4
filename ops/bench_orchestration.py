"""Orchestration benchmark, NULL generator (benchmark only): queues, leases, audit writes.

    .venv/bin/python ops/bench_orchestration.py [--items N] [--shard-sizes 1,32,64]
                                                [--naive-items M] [--caches warm]
                                                [--repeat R]

It measures what the orchestration costs, not what a model costs: generation uses the
`null` backend (a fixed cited sentence), while the router, retrieval (real embedder, real
FAISS index over the example corpus), validation, the shard-stage leases and every audit
write are the real ones. The numbers are items per second through:

* the naive baseline: shard size 1, i.e. one Celery chain per item;
* the four stage queues at each other shard size (shard 32 and 64 by default);
* the in-process limit: the same admission and the same four stage tasks with the same
  audit writes, called directly in this process in chain order, with no queue (shard 32).

Both Redis caches are on, as in the distributed mode's defaults (retrieval results, and
embedding vectors: the router's question vector serves retrieval's search). `--caches`
chooses what they can serve:

* `cold` (default): every request's question is new in the run, so each is embedded once
  (by the router) and searched once. Query embedding is then real compute that batching
  cannot remove (MiniLM on one CPU thread), so the run also measures it alone and prints
  the ceiling it puts on any shard/naive ratio.
* `warm`: the benchmark's 80 questions repeat and are in both caches before the first
  measurement, so every run, naive, batched and in-process alike, is served from them:
  what is left is the orchestration (queues, leases, stage I/O, audit writes) and the
  stages' own CPU work (routing rules, sanitizer, validators).

This machine is shared and noisy (run to run, a rate moves by a fifth): `--repeat R` runs
every measurement R times, interleaved (round 1's naive, shards, then round 2's...), pairs
each ratio within its round, and reports the median ratio with every round's value. The
benchmark's database is vacuumed and analyzed after warm-up and after every measured run,
outside the timing, with autovacuum off for its tables, so that no run pays at random for the
rows of the runs before it; the report shows what that maintenance cost each run and the
ratios as they would be with it charged (a bound: see Bench.settle).

Everything it touches is its own and is removed at the end: a fresh Postgres database
(sluice_bench_<random>), a unique Redis key prefix, a temporary data dir, four worker
processes (one per stage queue: prefork with one child; generation a threads pool). Exit
status: 0 when every measurement ran and every request ended terminal (goals met or not), 1
on any error.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
# Run as a script, Python puts ops/ first on sys.path, where jobs.py, models.py... would
# shadow top-level names; the repository root is what Sluice's imports expect.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_ROOT))

B = TypeVar("B", bound="Bench")
TITLE = "Sluice orchestration benchmark -- NULL generator (benchmark only, not model throughput)"
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_URL = "postgresql://postgres@127.0.0.1:5432/{name}"
REDIS_URL = "redis://127.0.0.1:6379/0"
IN_PROCESS_SHARD = 32
GOALS = (("shard32 / naive", 32, "naive", 20.0),
         ("shard64 / naive", 64, "naive", 30.0),
         ("shard32 / in-process", 32, "inproc", 0.7))

# Answer questions over the example corpus; none trips a refuse rule of the router.
QUESTIONS = [
    "When does the on-call handoff happen?",
    "What was the root cause of INC-2057?",
    "How many days do I have to submit an expense report?",
    "What p95 solve time triggers the RoutePlannerSolveLatencyHigh alert?",
    "How do I roll back a bad deploy?",
    "How long are database backups retained?",
    "What caused the dispatch gateway certificate to expire in INC-2063?",
    "How is fleet telemetry consumer lag detected and fixed?",
    "What are the incident severity levels?",
    "Who updates the status page during an incident?",
    "How can a customer track a shipment?",
    "What is the travel booking policy for flights?",
    "How long is customer data retained?",
    "What changes during peak season operations?",
    "How do I reach the IT helpdesk?",
    "What does the billing API runbook say about duplicate invoices?",
    "How does the ETA notifier recover from a backlog?",
    "What is checked before a deploy goes out?",
    "Which team owns the customs docs service?",
    "What should I do when the route planner is slow?",
]
PHRASINGS = ["{q}", "Quick question: {q}", "According to our docs, {q}", "Please answer: {q}"]
# Who asks: with --caches cold every request of the run gets its own asker, so no text is
# asked twice (32 x 4 x 80 = 10,240 texts before they come round again). An appended number
# or tag would do it too, but it moves the router's classifier off `grounded_answer` for one
# question in seven; this form keeps 97% of them there (the rest: clarify, refuse, tool).
ASKERS = ["Ana", "Bo", "Chen", "Dana", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea",
          "Mo", "Nia", "Oli", "Pia", "Quin", "Rosa", "Sam", "Tess", "Uma", "Vik", "Wen", "Xia",
          "Yuri", "Zoe", "Abel", "Bea", "Cas", "Dev", "Eva", "Finn"]
TEAMS = ["ops", "billing", "fleet", "support"]
FRESH_QUESTIONS = len(ASKERS) * len(TEAMS) * len(QUESTIONS) * len(PHRASINGS)


def question_text(n: int, fresh: bool) -> str:
    """The n-th benchmark question: the 80 base texts in turn, each with the n-th asker when
    `fresh`."""
    base = len(QUESTIONS) * len(PHRASINGS)
    question = QUESTIONS[n % len(QUESTIONS)]
    text = PHRASINGS[(n % base) // len(QUESTIONS)].format(q=question)
    if not fresh:
        return text
    asker = n // base
    return (f"{ASKERS[asker % len(ASKERS)]} from the "
            f"{TEAMS[(asker // len(ASKERS)) % len(TEAMS)]} team asks: {text}")


class BenchError(RuntimeError):
    """A measurement that did not complete as it must (timeout, dead worker, stuck items)."""


@dataclass
class Measurement:
    label: str
    shard_size: int
    items: int
    shards: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    stage_runs: int = 0
    events: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by process group
    # Postgres CPU seconds of the VACUUM (ANALYZE) after the run (Bench.settle): not in `cpu`
    upkeep: float = 0.0

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_total(self) -> float:
        """CPU seconds of every process group together."""
        return sum(self.cpu.values())

    @property
    def cpu_ms_per_item(self) -> float:
        return self.cpu_total * 1000 / self.items


@dataclass
class Round:
    """One pass over every measurement: its ratios compare runs of the same pass."""

    naive: Measurement
    by_shard: dict[int, Measurement]
    inproc: Measurement | None = None


# -- CPU accounting --------------------------------------------------------------------------


def cpu_seconds(workers: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) used so far, by group: each stage's worker with its pool
    children, every Postgres and Redis process of this machine (other databases' work too:
    run it on a quiet machine), and this process. Linux /proc only ({} elsewhere). A process
    that exits between two readings takes its seconds with it (a Postgres backend closed by
    the pool), so the groups are a floor."""
    proc = Path("/proc")
    if not proc.is_dir():
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    by_pid = {pid: stage for stage, pid in workers.items()}
    totals: dict[str, float] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        pid, ppid = int(entry.name), int(fields[1])
        group = (by_pid.get(pid) or by_pid.get(ppid)
                 or ("postgres" if name.startswith("postgres") else None)
                 or ("redis" if name.startswith("redis-server") else None)
                 or ("benchmark" if pid == os.getpid() else None))
        if group is not None:
            totals[group] = totals.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return totals


def cpu_since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {group: max(0.0, after[group] - before.get(group, 0.0)) for group in after}


# -- environment, database, redis -------------------------------------------------------------


def prepare_environment(db_name: str, prefix: str, data_dir: Path, caches: str = "redis") -> str:
    """SLUICE_* for this process and (through worker_env) its workers: before any import of
    workers.app, which builds the Celery app from the settings at import time. `caches` is
    the mode of both caches (`redis` here; `off` for a benchmark that must not use them)."""
    url = PG_URL.format(name=db_name)
    os.environ.update({
        "SLUICE_ENVIRONMENT": "development",  # the null generator is refused in production
        "SLUICE_GENERATOR_BACKEND": "null",
        "SLUICE_DATA_DIR": str(data_dir),
        "SLUICE_DATABASE_URL": url,
        "SLUICE_BROKER_URL": REDIS_URL,
        "SLUICE_BROKER_KEY_PREFIX": prefix,
        "SLUICE_RETRIEVAL_CACHE": caches,
        "SLUICE_EMBEDDING_CACHE": caches,
        # The same one thread per process the workers get from worker_env, so the in-process
        # limit is not flattered by a multi-threaded embedder.
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    })
    os.environ.pop("SLUICE_SHARD_SIZE", None)  # set per measurement below
    return url


def create_database(name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(name: str, url: str) -> None:
    import psycopg
    from psycopg import sql

    if "workers.store.engine" in sys.modules:
        from workers.store.engine import get_engine

        get_engine(url).dispose()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                     .format(sql.Identifier(name)))


def delete_redis_keys(prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
        return len(keys)
    finally:
        client.close()


# -- job files ---------------------------------------------------------------------------------


def write_job_file(folder: Path, tag: str, count: int, first: int = 0,
                   fresh: bool = False) -> Path:
    """`count` answer requests for tenant acme, questions `first`... (see `question_text`);
    `tag` makes the content (so the job id) new."""
    path = folder / f"{tag}.jsonl"
    lines = []
    for i in range(count):
        lines.append(json.dumps({
            "custom_id": f"{tag}-{i:06d}", "tenant": "acme", "grants": ["public", "engineering"],
            "request": {"kind": "answer", "question": question_text(first + i, fresh)}}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- measurements --------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, data_dir: Path) -> None:
        from workers.settings import Settings

        self.args = args
        self.data_dir = data_dir
        self.jobs_dir = data_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.settings = Settings()
        self.fleet: Any = None
        self.run_tag = secrets.token_hex(3)
        self.asked = 0  # questions written so far: with --caches cold, the next one is new

    # setup

    def prepare_store(self) -> None:
        from ops.corpus import build_index, ingest_tree
        from workers.store.migrate import upgrade

        started = time.perf_counter()
        upgrade(self.settings.database_url)
        self.vacuum_by_hand()
        report = ingest_tree(self.settings, self.settings.corpus_dir)
        index_id, _ = build_index(self.settings)
        say(f"store ready: {report.added} documents ingested, index {index_id} "
            f"({time.perf_counter() - started:.1f}s)")

    def start_workers(self) -> None:
        from ops.embedded import WorkerFleet

        self.fleet = WorkerFleet(self.settings, self.data_dir / "logs", concurrency=1)
        self.fleet.start()
        say(f"started {len(self.fleet.processes)} workers (concurrency 1 each): "
            + ", ".join(f"{s.value}={p.pid}" for s, p in self.fleet.processes.items()))

    def stop_workers(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()
            self.fleet = None

    def warm_up(self) -> None:
        started = time.perf_counter()
        self.through_queues("warm-up (queues)", 4, 8, timeout_s=self.args.warmup_timeout_s)
        self.in_process("warm-up (in-process)", 4, 4)
        # 80 questions more (with --caches warm: every distinct one, so both Redis caches
        # fill): the validators' per-process vectors of the chunks warm the same way for
        # every run in both modes.
        self.through_queues("warm-up (all queries)", 32, len(QUESTIONS) * len(PHRASINGS),
                            timeout_s=self.args.warmup_timeout_s)
        say(f"warmed up ({time.perf_counter() - started:.1f}s)")
        self.settle()

    def _autocommit(self) -> Any:
        """A connection to the benchmark's store outside any transaction (VACUUM needs one)."""
        from workers.store.engine import get_engine

        engine = get_engine(self.settings.database_url)
        return engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def vacuum_by_hand(self) -> None:
        """Autovacuum off for this database's tables: `settle` vacuums them after warm-up and
        after each measured run instead. Autovacuum starts when a table's changes pass a
        threshold, at a point no run chooses, and the run it overlaps pays for the rows of the
        runs before it (on 2026-12-07 one shard-64 run measured 1.61 ms of Postgres CPU per
        item against 0.34-0.45 in the other five rounds, and its ratio fell to 18.5x)."""
        with self._autocommit() as conn:
            tables = conn.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()").scalars()
            for table in list(tables):
                conn.exec_driver_sql(f'ALTER TABLE "{table}" SET (autovacuum_enabled = false, '
                                     "toast.autovacuum_enabled = false)")

    def settle(self) -> float:
        """VACUUM (ANALYZE) after warm-up and after every measured run, outside its timing, so
        that every run starts from a vacuumed store with planner statistics, as a store in
        service has them; the Postgres CPU seconds it took.

        Without statistics (a database created for this run has none until its first
        analyze) Postgres plans a shard's terminal update as a nested loop that parses the
        shard's rows once per request (measured on 12,800 requests: 34-50 us of server CPU
        per request at shard 64, 80-87 at 256, against 13-18 us with statistics).

        The maintenance is left out of every run's rate, naive and sharded alike, and that
        flatters the sharded runs, whose CPU per item is the smaller: the report shows it per
        run (the `vacuum` column) and the ratios as they would be if each run were charged
        the call after it. That bound overstates what a store in service pays per item:
        autovacuum analyzes a table after a tenth of it has changed, and vacuums one after a
        fifth, where this call does the whole database after every run."""
        before = cpu_seconds({}).get("postgres", 0.0)
        with self._autocommit() as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE)")
        return max(0.0, cpu_seconds({}).get("postgres", 0.0) - before)

    def embedding_cost(self) -> float:
        """Seconds per query of batched query embedding alone (shard-sized batches)."""
        from tasks.embedding import Embedder

        embedder = Embedder(self.settings.embedder_model)
        texts = [question_text(n, self.args.caches == "cold")
                 for n in range(len(QUESTIONS) * len(PHRASINGS))]
        embedder.encode(texts[:IN_PROCESS_SHARD])
        started = time.perf_counter()
        for _ in range(2):
            for start in range(0, len(texts), IN_PROCESS_SHARD):
                embedder.encode(texts[start:start + IN_PROCESS_SHARD])
        return (time.perf_counter() - started) / (2 * len(texts))

    def cache_stats(self) -> str:
        from workers.cache import retrieval_cache, vector_cache

        results, vectors = retrieval_cache(self.settings).stats(), vector_cache(self.settings).stats()
        return (f"retrieval cache: {results.hits} hits, {results.misses} misses; "
                f"vector cache: {vectors.hits} hits, {vectors.misses} misses")

    # (a), (b): through the four queues

    def through_queues(self, label: str, shard_size: int, items: int,
                       timeout_s: float | None = None) -> Measurement:
        from ops.jobs import submit_job, wait_for_job
        from workers.settings import Settings

        settings = Settings(shard_size=shard_size)  # admission cuts shards with this
        path = self._job_file(label, shard_size, items)
        workers = {s.value: p.pid for s, p in (self.fleet.processes.items() if self.fleet else [])}
        cpu_before = cpu_seconds(workers)
        started = time.perf_counter()
        admitted = submit_job(settings, path)
        if not admitted.created:
            raise BenchError(f"{label}: job {admitted.job_id} already existed")
        done = wait_for_job(settings, admitted.job_id, self.check_workers,
                            timeout_s=timeout_s or self.args.timeout_s, poll_s=self.args.poll_s,
                            min_gap_s=self.args.min_gap_s)
        seconds = time.perf_counter() - started
        cpu = cpu_since(cpu_before, cpu_seconds(workers))
        if not done:
            raise BenchError(f"{label}: not every request terminal after "
                             f"{timeout_s or self.args.timeout_s:.0f}s: "
                             f"{self._counts(admitted.job_id)}")
        result = self._finish(label, shard_size, items, len(admitted.dispatches), seconds,
                              admitted.job_id)
        result.cpu = cpu
        result.upkeep = self.settle()
        return result

    def check_workers(self, _done: int, _total: int) -> None:
        """A waiter's progress hook: raise BenchError when a stage worker has exited."""
        for stage, process in (self.fleet.processes.items() if self.fleet else []):
            if process.poll() is not None:
                raise BenchError(f"the {stage.value} worker exited with {process.returncode}")

    # (c): the same stage tasks, in this process, no queue

    def in_process(self, label: str, shard_size: int, items: int) -> Measurement:
        from celery.exceptions import Ignore

        from ops.jobs import parse_job_file
        from schemas.status import Lane, Stage
        from tasks.queue_tasks import generate_shard, retrieve_shard, route_shard, validate_shard
        from workers.runtime import pinned_versions_now
        from workers.store.admission import admit_job_in_chunks

        tasks = {Stage.ROUTER: route_shard, Stage.RETRIEVAL: retrieve_shard,
                 Stage.GENERATION: generate_shard, Stage.VALIDATION: validate_shard}
        settings = self.settings
        path = self._job_file(label, shard_size, items)
        started = time.perf_counter()
        parsed = parse_job_file(path)
        # The admission submit_job makes, in chunks; the shards run after it, not on enqueue.
        admitted = admit_job_in_chunks(
            settings.database_url, name=path.name, content=parsed.content, lines=parsed.lines,
            malformed=parsed.malformed, line_numbers=parsed.line_numbers,
            versions=pinned_versions_now(settings), drift_policy=settings.drift_policy,
            shard_size=shard_size, lane=Lane.BATCH, on_dispatch=lambda _: None)
        for dispatch in admitted.dispatches:
            hop = dispatch.hop.model_dump()
            for stage in list(Stage)[list(Stage).index(dispatch.stage):]:
                try:
                    # A direct call runs StageTask.execute in this process: the same claim,
                    # lease, load, compute and commit as a worker, minus the broker.
                    hop = tasks[stage](hop)
                except Ignore:
                    break  # what ends a chain on the queues too (e.g. every item ended)
        seconds = time.perf_counter() - started
        if not admitted.created:
            raise BenchError(f"{label}: job {admitted.job_id} already existed")
        result = self._finish(label, shard_size, items, len(admitted.dispatches), seconds,
                              admitted.job_id)
        result.upkeep = self.settle()
        return result

    # checks shared by both

    def _finish(self, label: str, shard_size: int, items: int, shards: int, seconds: float,
                job_id: str) -> Measurement:
        from sqlalchemy import func, select

        from workers.store.engine import session_scope
        from workers.store.models import AuditEvent, Request, StageRun
        from workers.store.operators import unfinished

        with session_scope(self.settings.database_url) as session:
            left = unfinished(session, job_id)
            stage_runs = session.scalar(select(func.count()).select_from(StageRun)
                                        .join(Request, Request.id == StageRun.request_id)
                                        .where(Request.job_id == job_id)) or 0
            events = session.scalar(select(func.count()).select_from(AuditEvent)
                                    .join(Request, Request.id == AuditEvent.request_id)
                                    .where(Request.job_id == job_id)) or 0
        counts = self._counts(job_id)
        if left or sum(counts.values()) != items:
            raise BenchError(f"{label}: {left} of {sum(counts.values())} requests not terminal "
                             f"(expected {items} terminal): {counts}")
        result = Measurement(label, shard_size, items, shards, seconds, counts, stage_runs,
                             events)
        say(f"{label:<26} {items:>6} items {shards:>5} shards {seconds:>8.2f}s "
            f"{result.rate:>9.1f} items/s  {fmt_counts(counts)}")
        return result

    def _counts(self, job_id: str) -> dict[str, int]:
        from workers.store.admission import job_counts
        from workers.store.engine import session_scope

        with session_scope(self.settings.database_url) as session:
            return job_counts(session, job_id)

    def _job_file(self, label: str, shard_size: int, items: int) -> Path:
        fresh = self.args.caches == "cold"
        if fresh and self.asked + items > FRESH_QUESTIONS:
            raise BenchError(f"--caches cold has {FRESH_QUESTIONS} distinct questions; this "
                             f"run would ask {self.asked + items}: lower --items")
        path = write_job_file(self.jobs_dir, self._tag(label, shard_size), items,
                              self.asked if fresh else 0, fresh)
        self.asked += items
        return path

    def _tag(self, label: str, shard_size: int) -> str:
        kind = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")
        return f"bench-{self.run_tag}-{kind}-s{shard_size}"[:100]


# -- report --------------------------------------------------------------------------------------


def fmt_counts(counts: dict[str, int]) -> str:
    return " ".join(f"{status}={n}" for status, n in sorted(counts.items())) or "-"


def report(rows: list[Measurement], rounds: list[Round], embed_s: float | None,
           cache: str) -> None:
    print()
    print(TITLE)
    print(f"caches: {cache}" + (f"; {len(rounds)} rounds, each ratio of runs in the same "
                                f"round, median shown" if len(rounds) > 1 else ""))
    print()
    header = (f"{'run':<24} {'items':>6} {'shards':>6} {'seconds':>8} {'items/s':>9} "
              f"{'runs/item':>9} {'events/item':>11}  statuses")
    print(header)
    print("-" * len(header))
    for m in rows:
        print(f"{m.label:<24} {m.items:>6} {m.shards:>6} {m.seconds:>8.2f} {m.rate:>9.1f} "
              f"{m.stage_runs / m.items:>9.2f} {m.events / m.items:>11.2f}  "
              f"{fmt_counts(m.counts)}")
    print()
    print(f"{'ratio':<24} {'value':>8} {'goal':>8}  met")
    print("-" * 48)
    for name, shard, against, goal in GOALS:
        values = [v for v in (_ratio(r, shard, against) for r in rounds) if v is not None]
        if not values:
            print(f"{name:<24} {'n/a':>8} {'>=' + f'{goal:g}x':>8}  n/a (shard {shard} not run)")
            continue
        value = statistics.median(values)
        met = "yes" if value >= goal else "NO"
        print(f"{name:<24} {value:>7.2f}x {'>=' + f'{goal:g}x':>8}  {met}{_each_round(values)}")
    report_charged(rounds)
    naive = rounds[0].naive
    if embed_s is not None and naive.rate > 0:
        naive_s = 1 / naive.rate
        print(f"\nquery embedding alone, batched by {IN_PROCESS_SHARD}, one thread: "
              f"{embed_s * 1000:.2f} ms/query; naive run: {naive_s * 1000:.2f} ms/item")
        print(f"ceiling of any batched/naive ratio while every query embeds: "
              f"{naive_s / embed_s:.1f}x")
    report_cpu([m for m in rows if m.cpu], rounds)
    failed = sum(m.counts.get("failed", 0) for m in rows)
    if failed:
        print(f"\nnote: {failed} request(s) ended failed (terminal, but see the counts above)")


def report_charged(rounds: list[Round]) -> None:
    """The naive ratios as they would be if each run were also charged the VACUUM (ANALYZE)
    that follows it (Bench.settle): each rate scaled by CPU / (CPU + vacuum), which holds
    while the runs keep the cores equally busy. A bound, not a goal: see Bench.settle."""
    lines = []
    for name, shard, against, _ in GOALS:
        if against != "naive":
            continue
        values = [v for v in (_charged_ratio(r, shard) for r in rounds) if v is not None]
        if values:
            lines.append(f"{name:<24} {statistics.median(values):>7.2f}x{_each_round(values)}")
    if lines:
        print("\nwith each run charged its VACUUM (ANALYZE) (a bound; see `vacuum` below):")
        print("\n".join(lines))


def _each_round(values: list[float]) -> str:
    return ("  rounds: " + ", ".join(f"{v:.2f}x" for v in values)) if len(values) > 1 else ""


def _charged_ratio(round_: Round, shard: int) -> float | None:
    top, base = round_.by_shard.get(shard), round_.naive
    if top is None or not (top.cpu and base.cpu) or base.rate <= 0:
        return None

    def share(m: Measurement) -> float:
        spent = m.cpu_total
        return spent / (spent + m.upkeep) if spent > 0 else 1.0

    return top.rate * share(top) / (base.rate * share(base))


def _ratio(round_: Round, shard: int, against: str) -> float | None:
    top = round_.by_shard.get(shard)
    base = round_.naive if against == "naive" else round_.inproc
    if top is None or base is None:
        return None
    return top.rate / base.rate if base.rate > 0 else float("inf")


CPU_GROUPS = ("router", "retrieval", "generation", "validation", "postgres", "redis", "benchmark")


def report_cpu(rows: list[Measurement], rounds: list[Round]) -> None:
    """CPU milliseconds per item by process group, and what they say about the goals: a run's
    CPU per item is F/s + P (F: each shard's fixed cost over the four stages, P: each item's),
    so shards 32 and 64 give F and P, and a goal g at shard s needs P <= naive/g - F/s. That
    reads CPU time for wall time: it holds while the runs keep the same cores as busy (the
    `cores` column). `vacuum`: the Postgres CPU of the VACUUM (ANALYZE) after the run (not in
    `total`)."""
    if not rows:
        return
    print()
    header = (f"{'CPU ms per item':<24} " + " ".join(f"{g[:10]:>10}" for g in CPU_GROUPS)
              + f" {'total':>8} {'cores':>6} {'vacuum':>7}")
    print(header)
    print("-" * len(header))
    for m in rows:
        print(f"{m.label:<24} " + " ".join(f"{m.cpu.get(g, 0.0) * 1000 / m.items:>10.2f}"
                                            for g in CPU_GROUPS)
              + f" {m.cpu_ms_per_item:>8.2f} {m.cpu_total / m.seconds:>6.2f}"
              + f" {m.upkeep * 1000 / m.items:>7.2f}")
    report_model(rounds)


def report_model(rounds: list[Round]) -> None:
    """F and P from the CPU per item at shards 32 and 64, and the P each naive goal needs.
    Over several rounds, fitted to each size's median CPU per item: a fit to one round's two
    runs swings with the machine (P from 0.4 to 2.5 ms in one six-round run), and F/s + P
    of this fit is each size's median run, which the medians of per-round fits need not
    reproduce."""
    fitted = [r for r in rounds if r.naive.cpu and all(
        s in r.by_shard and r.by_shard[s].cpu for s in (32, 64))]
    if not fitted:
        return

    def per_item(runs: list[Measurement]) -> float:
        return statistics.median(m.cpu_ms_per_item for m in runs)

    at = {s: per_item([r.by_shard[s] for r in fitted]) for s in (32, 64)}
    fixed = (at[32] - at[64]) / (1 / 32 - 1 / 64)
    item = at[64] - fixed / 64
    naive_ms = per_item([r.naive for r in fitted])
    which = f" (medians of {len(fitted)} rounds)" if len(fitted) > 1 else ""
    print(f"\nCPU model{which}: F = {fixed:.1f} ms per shard (four stages), "
          f"P = {item:.2f} ms per item; naive {naive_ms:.1f} ms per item")
    for name, shard, against, goal in GOALS:
        if against != "naive":
            continue
        budget = naive_ms / goal - fixed / shard
        need = (f"P <= {budget:.2f} ms" if budget > 0 else
                f"F/{shard} alone exceeds naive/{goal:g}: no P is small enough")
        print(f"  {name} >= {goal:g}x needs {need} (now {item:.2f})")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--items", type=int, default=512,
                        help="requests per measured job (default 512)")
    parser.add_argument("--shard-sizes", default="1,32,64",
                        help="comma-separated shard sizes through the queues; 1 is the naive "
                             "baseline, one chain per item, and always runs (default 1,32,64)")
    parser.add_argument("--naive-items", type=int, default=None,
                        help="requests for the naive shard-1 run (default: --items)")
    parser.add_argument("--timeout-s", type=float, default=1800.0,
                        help="give up on one measured job after this (default 1800)")
    parser.add_argument("--warmup-timeout-s", type=float, default=300.0)
    parser.add_argument("--caches", choices=("cold", "warm"), default="cold",
                        help="cold: every question is new, so each embeds once (default); "
                             "warm: the Redis caches serve every run, leaving orchestration "
                             "and the stages' own CPU work")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every measurement; each ratio compares runs of one "
                             "round and the report shows the median over rounds (default 1)")
    parser.add_argument("--poll-s", type=float, default=0.5,
                        help="longest time between two counts of a job's requests (default 0.5)")
    parser.add_argument("--min-gap-s", type=float, default=0.05,
                        help="shortest time between two looks at a job asked for by "
                             "notifications that do not say how many requests ended (a "
                             "cancel, a stage failed as a whole); the stage commits of a "
                             "run say how many, so this rarely matters (default 0.05)")
    args = parser.parse_args(argv)
    try:
        sizes = sorted({int(s) for s in args.shard_sizes.split(",") if s.strip()} | {1})
    except ValueError:
        parser.error(f"--shard-sizes must be integers, got {args.shard_sizes!r}")
    if any(s < 1 or s > 1024 for s in sizes):
        parser.error("shard sizes must be within 1..1024")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.items < 1 or (args.naive_items is not None and args.naive_items < 1):
        parser.error("--items and --naive-items must be positive")
    args.sizes = sizes
    args.naive_items = args.naive_items or args.items
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def measure(bench: Bench) -> None:
        rounds: list[Round] = []
        for n in range(args.repeat):
            mark = f" #{n + 1}" if n else ""  # the first pass keeps the plain labels
            naive = bench.through_queues(f"naive (shard 1){mark}", 1, args.naive_items)
            by_shard = {1: naive}
            for size in args.sizes:
                if size != 1:
                    by_shard[size] = bench.through_queues(f"shard {size}{mark}", size, args.items)
            rounds.append(Round(naive, by_shard))
        bench.stop_workers()  # idle workers poll Redis; give the in-process run the cores
        for n, round_ in enumerate(rounds):
            mark = f" #{n + 1}" if n else ""
            round_.inproc = bench.in_process(f"in-process limit ({IN_PROCESS_SHARD}){mark}",
                                             IN_PROCESS_SHARD, args.items)
        rows = [m for r in rounds for m in [r.naive, *(m for s, m in r.by_shard.items() if s != 1)]]
        rows += [r.inproc for r in rounds if r.inproc is not None]
        embed_s = bench.embedding_cost() if args.caches == "cold" else None
        say(bench.cache_stats())
        report(rows, rounds, embed_s, args.caches)

    return run_on_warm_workers(TITLE, measure, args)


def run_on_warm_workers(title: str, measure: Callable[[Bench], None],
                        args: argparse.Namespace | None = None) -> int:
    """The setup of this benchmark and of those built on it (online latency, concurrent
    waits): `run_in_fresh_store` with the store, one worker per stage, warmed up (with
    `args`' caches, warm by default), then `measure(bench)`, which prints its figures."""

    def warm_then_measure(bench: Bench) -> None:
        bench.prepare_store()
        bench.start_workers()
        bench.warm_up()
        measure(bench)

    return run_in_fresh_store(title, prepare_environment,
                              lambda data_dir: Bench(args or parse_args(["--caches", "warm"]),
                                                     data_dir),
                              warm_then_measure)


def run_in_fresh_store(title: str, configure: Callable[[str, str, Path], str],
                       make: Callable[[Path], B], measure: Callable[[B], None]) -> int:
    """A fresh database and Redis prefix, the environment `configure(db_name, prefix,
    data_dir)` sets (it returns the store's URL), the bench `make(data_dir)` builds, then
    `measure(bench)`; then everything removed. Exit status: 0, or 1 on any error (130 on an
    interrupt), with the workers' last log lines."""
    token = secrets.token_hex(4)
    db_name, prefix = f"sluice_bench_{token}", f"sluice_bench_{token}:"
    data_dir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    url = configure(db_name, prefix, data_dir)
    say(title)
    say(f"database {db_name}, redis prefix {prefix!r}, data dir {data_dir}")
    bench: B | None = None
    created = False
    status = 0
    try:
        create_database(db_name)
        created = True
        bench = make(data_dir)
        measure(bench)
    except BaseException as exc:  # noqa: BLE001 -- report, clean up, exit 1
        status = 130 if isinstance(exc, KeyboardInterrupt) else 1
        say(f"\nERROR: {type(exc).__name__}: {exc}")
        if not isinstance(exc, BenchError):
            traceback.print_exc()
        logs = data_dir / "logs"
        for log in sorted(logs.glob("worker-*.log")) if logs.is_dir() else []:
            say(f"--- last lines of {log.name} ---\n{tail(log)}")
    finally:
        status = cleanup(bench, created, db_name, url, prefix, data_dir) or status
    return status


def cleanup(bench: Bench | None, created: bool, db_name: str, url: str, prefix: str,
            data_dir: Path) -> int:
    """Workers, then the Celery producer, the database, Redis keys, the data dir."""
    problems = 0
    steps = [
        ("stop workers", lambda: bench.stop_workers() if bench else None),
        ("close broker connections", _close_celery),
        ("drop database", lambda: drop_database(db_name, url) if created else None),
        ("delete redis keys", lambda: say(f"deleted {delete_redis_keys(prefix)} redis keys")),
        ("remove data dir", lambda: shutil.rmtree(data_dir, ignore_errors=True)),
    ]
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 -- every step runs
            problems += 1
            say(f"cleanup: {name} failed: {type(exc).__name__}: {exc}")
    say("cleaned up" if not problems else f"cleanup finished with {problems} problem(s)")
    return 1 if problems else 0


def _close_celery() -> None:
    if "workers.app" in sys.modules:
        sys.modules["workers.app"].app.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
