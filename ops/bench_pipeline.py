"""Pipeline overhead benchmark: the generation engine inside the four-queue pipeline against
the same engine alone, on the same prompts and the same model, in one run.

    .venv/bin/python ops/bench_pipeline.py [--requests N] [--shard-size S] [--max-new-tokens T]
                                           [--engine-submit shards|all] [--json PATH]

1. Pipeline: a fresh store and broker as in ops/bench_orchestration.py, the real transformers
   generator, no repair rounds (each request is generated exactly once), the retrieval cache
   off. Four workers start and a small warm-up job passes through every stage (so no model
   loads while timed); then one job of N grounded questions (tenant acme, from
   ops/examples/retrieval_eval.jsonl) is timed from admission until every request is
   terminal: T_pipeline. Its tokens and engine figures come from its model-call events.
2. Engine alone: with the workers stopped, this process rebuilds the generation stage's
   inputs of that job from the store (`load_shard`, run 0 round 0, as the worker loads
   them) and calls the generation stage function `compute_generation` (generation_input,
   then generate on the engine) on a fresh `Runtime`, i.e. a fresh GenerationEngine over
   TransformersBackend with the worker's settings. `--engine-submit shards` (default): the
   job's generation shards, submitted by `generation_concurrency` threads at once, as the
   generation worker's threads pool would at best see them; `all`: every request in one call.
   Timed after an untimed warm-up on the warm-up job's inputs: T_engine.

Overhead = 1 - T_engine / T_pipeline (goal <= 10%). Greedy decoding: the engine-alone
completions should match the pipeline's per request; the agreement rate is printed.

Everything it creates (database, Redis keys, data dir, workers) is removed at the end, as in
bench_orchestration. Exit status: 0 when both runs completed (goal met or not), 1 on error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
# Run as a script, Python puts ops/ first on sys.path, where jobs.py, models.py... would
# shadow top-level names; the repository root is what Sluice's imports expect.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_ROOT))

from ops.bench_orchestration import (  # noqa: E402 -- after the sys.path fix above
    PHRASINGS,
    Bench,
    BenchError,
    fmt_counts,
    prepare_environment,
    run_in_fresh_store,
    say,
)

TITLE = "Sluice pipeline overhead benchmark -- engine in the four-queue pipeline vs engine alone"
EVAL_PATH = _ROOT / "ops" / "examples" / "retrieval_eval.jsonl"
TENANT = "acme"
WARMUP_REQUESTS = 2
OVERHEAD_GOAL = 0.10


@dataclass
class JobRun:
    """One job through the queues: its id, wall time and when it was admitted."""

    job_id: str
    seconds: float
    submitted_at: datetime
    counts: dict[str, int]


@dataclass
class GenerationRun:
    """Per-request drafts and model-call payloads of one way of generating."""

    seconds: float
    drafts: dict[str, dict[str, Any]] = field(default_factory=dict)  # request id -> draft
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)  # request id -> payload

    @property
    def tokens(self) -> int:
        return sum(int(c["completion_tokens"]) for c in self.calls.values())


# -- the workload ---------------------------------------------------------------------------------


def load_questions(path: Path = EVAL_PATH, tenant: str = TENANT) -> list[dict[str, Any]]:
    """The tenant's evaluation questions with the grants that retrieve their documents;
    natural-language questions first (the kind of request the pipeline answers)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    mine = [r for r in rows if r["tenant"] == tenant]
    if not mine:
        raise BenchError(f"{path}: no questions for tenant {tenant!r}")
    return sorted(mine, key=lambda r: r.get("style") != "natural")


def write_questions_job(folder: Path, tag: str, questions: list[dict[str, Any]],
                        count: int) -> Path:
    """`count` answer requests cycling through `questions`, rephrased on each pass."""
    lines = []
    for i in range(count):
        row = questions[i % len(questions)]
        phrasing = PHRASINGS[(i // len(questions)) % len(PHRASINGS)]
        lines.append(json.dumps({
            "custom_id": f"{tag}-{i:06d}", "tenant": row["tenant"], "grants": row["grants"],
            "request": {"kind": "answer", "question": phrasing.format(q=row["question"])}}))
    path = folder / f"{tag}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- the benchmark ----------------------------------------------------------------------------


class PipelineBench(Bench):
    """bench_orchestration's store, workers and checks, with real generation."""

    def __init__(self, args: argparse.Namespace, data_dir: Path) -> None:
        super().__init__(args, data_dir)
        self.questions = load_questions()
        self.runtime: Any = None  # this process's Runtime for the engine-alone run

    # through the queues

    def run_job(self, label: str, count: int, timeout_s: float) -> JobRun:
        from ops.jobs import submit_job, wait_for_job

        path = write_questions_job(self.jobs_dir, self._tag(label, self.settings.shard_size),
                                   self.questions, count)
        submitted_at = datetime.now(UTC)
        started = time.perf_counter()
        admitted = submit_job(self.settings, path)
        if not admitted.created:
            raise BenchError(f"{label}: job {admitted.job_id} already existed")
        done = wait_for_job(self.settings, admitted.job_id, self.check_workers,
                            timeout_s=timeout_s, poll_s=self.args.poll_s)
        seconds = time.perf_counter() - started
        if not done:
            raise BenchError(f"{label}: not every request terminal after {timeout_s:.0f}s: "
                             f"{self._counts(admitted.job_id)}")
        measured = self._finish(label, self.settings.shard_size, count,
                                len(admitted.dispatches), seconds, admitted.job_id)
        return JobRun(admitted.job_id, seconds, submitted_at, measured.counts)

    def pipeline_generation(self, job: JobRun) -> GenerationRun:
        """The job's drafts (generation stage outputs) and model-call events, run 0 round 0."""
        from sqlalchemy import select

        from schemas.events import EventKind
        from schemas.status import Stage
        from workers.store.engine import session_scope
        from workers.store.models import AuditEvent, Request, StageRun

        result = GenerationRun(job.seconds)
        with session_scope(self.settings.database_url) as session:
            for rid, payload in session.execute(
                    select(AuditEvent.request_id, AuditEvent.payload)
                    .join(Request, Request.id == AuditEvent.request_id)
                    .where(Request.job_id == job.job_id, AuditEvent.run == 0,
                           AuditEvent.round == 0,
                           AuditEvent.kind == EventKind.MODEL_CALL.value)):
                result.calls[rid] = payload
            for rid, output in session.execute(
                    select(StageRun.request_id, StageRun.output)
                    .join(Request, Request.id == StageRun.request_id)
                    .where(Request.job_id == job.job_id, StageRun.run == 0,
                           StageRun.round == 0, StageRun.stage == Stage.GENERATION.value,
                           StageRun.request_id.in_(list(result.calls)))):
                result.drafts[rid] = output or {}
        return result

    def generation_records(self, job_id: str, request_ids: set[str]) -> list[list[Any]]:
        """The generation stage's inputs, shard by shard, loaded as the worker loads them."""
        from sqlalchemy import select

        from schemas.stages import Hop
        from schemas.status import Stage
        from workers.store.engine import session_scope
        from workers.store.models import Request, StageRun
        from workers.store.stage_runs import StageKey, load_shard

        with session_scope(self.settings.database_url) as session:
            shards: dict[str, list[str]] = defaultdict(list)
            for rid, shard_id in session.execute(
                    select(StageRun.request_id, StageRun.shard_id)
                    .join(Request, Request.id == StageRun.request_id)
                    .where(Request.job_id == job_id, StageRun.run == 0, StageRun.round == 0,
                           StageRun.stage == Stage.GENERATION.value)
                    .order_by(Request.line_no)):
                if rid in request_ids:
                    shards[shard_id].append(rid)
            return [load_shard(session, ids, StageKey(Hop(shard_id=sid, run=0, round=0),
                                                      Stage.GENERATION))[1]
                    for sid, ids in shards.items()]

    def stage_spans(self, job: JobRun) -> dict[str, dict[str, float]]:
        """Per stage: busy seconds (sum of its shards' durations), and its first start and
        last finish in seconds after admission."""
        from sqlalchemy import func, select

        from workers.store.engine import session_scope
        from workers.store.models import Request, StageRun

        with session_scope(self.settings.database_url) as session:
            rows = session.execute(
                select(StageRun.stage, func.max(StageRun.duration_s),
                       func.min(StageRun.started_at), func.max(StageRun.finished_at))
                .join(Request, Request.id == StageRun.request_id)
                .where(Request.job_id == job.job_id, StageRun.run == 0)
                .group_by(StageRun.stage, StageRun.shard_id, StageRun.round)).all()
        spans: dict[str, dict[str, float]] = {}
        for stage, duration_s, started, finished in rows:
            span = spans.setdefault(stage, {"busy_s": 0.0, "first_start_s": float("inf"),
                                            "last_end_s": 0.0})
            span["busy_s"] += duration_s or 0.0
            if started is not None:
                span["first_start_s"] = min(span["first_start_s"], _after(started, job))
            if finished is not None:
                span["last_end_s"] = max(span["last_end_s"], _after(finished, job))
        return spans

    # the engine alone

    def engine_alone(self, shards: list[list[Any]], warmup: list[list[Any]]) -> GenerationRun:
        """The generation stage function on this process's fresh engine, timed after an
        untimed pass over the warm-up job's inputs."""
        from workers.runtime import Runtime

        self.runtime = Runtime(self.settings)
        try:
            self._generate(warmup, "shards")
            started = time.perf_counter()
            outputs = self._generate(shards, self.args.engine_submit)
            result = GenerationRun(time.perf_counter() - started)
        finally:
            self.runtime.close()
        for results, events in outputs:
            result.drafts.update({r.request_id: r.output for r in results})
            result.calls.update({e.request_id: e.payload for e in events})
        return result

    def _generate(self, shards: list[list[Any]], submit: str) -> list[Any]:
        from tasks.queue_tasks import compute_generation

        if submit == "all":
            return [compute_generation(self.runtime, [r for s in shards for r in s], None)]
        with ThreadPoolExecutor(max_workers=self.settings.generation_concurrency) as pool:
            return list(pool.map(lambda records: compute_generation(self.runtime, records, None),
                                 shards))


def _after(moment: datetime, job: JobRun) -> float:
    """Seconds from the job's admission to a stored moment (SQLite hands back naive UTC)."""
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return (moment - job.submitted_at).total_seconds()


# -- figures and report ---------------------------------------------------------------------------


def engine_figures(run: GenerationRun, wall_s: float) -> dict[str, float]:
    calls = list(run.calls.values())
    compute_s = sum(float(c["compute_s"]) for c in calls)
    n = max(len(calls), 1)
    return {"model_calls": len(calls),
            "prompt_tokens": sum(int(c["prompt_tokens"]) for c in calls),
            "mean_batch_size": sum(int(c["batch_size"]) for c in calls) / n,
            "compute_s": compute_s,
            "utilisation": compute_s / wall_s if wall_s > 0 else 0.0,
            "mean_queue_wait_s": sum(float(c["queue_wait_s"]) for c in calls) / n}


def agreement(pipeline: GenerationRun, engine: GenerationRun) -> dict[str, Any]:
    ids = sorted(pipeline.calls)
    tokens = [int(pipeline.calls[i]["completion_tokens"])
              == int(engine.calls.get(i, {}).get("completion_tokens", -1)) for i in ids]
    texts = [pipeline.drafts.get(i, {}).get("text") == engine.drafts.get(i, {}).get("text")
             for i in ids]
    n = max(len(ids), 1)
    return {"requests": len(ids), "completion_tokens": sum(tokens) / n, "text": sum(texts) / n,
            "missing_in_engine": [i for i in ids if i not in engine.calls]}


def figures(args: argparse.Namespace, bench: PipelineBench, job: JobRun,
            pipeline: GenerationRun, engine: GenerationRun,
            spans: dict[str, dict[str, float]]) -> dict[str, Any]:
    settings = bench.settings
    t_pipe, t_eng = pipeline.seconds, engine.seconds
    overhead = 1 - t_eng / t_pipe
    in_pipeline = engine_figures(pipeline, t_pipe)
    return {
        "title": TITLE, "model": settings.generator_model, "requests": args.requests,
        "generated_requests": len(pipeline.calls), "statuses": job.counts,
        "shard_size": settings.shard_size, "max_new_tokens": settings.max_new_tokens,
        "generation_concurrency": settings.generation_concurrency,
        "generator_max_batch": settings.generator_max_batch,
        "torch_threads": settings.torch_threads, "engine_submit": args.engine_submit,
        "completion_tokens": {"pipeline": pipeline.tokens, "engine": engine.tokens},
        "seconds": {"pipeline": t_pipe, "engine": t_eng},
        "tokens_per_s": {"pipeline": pipeline.tokens / t_pipe, "engine": engine.tokens / t_eng},
        "overhead": overhead, "overhead_goal": OVERHEAD_GOAL,
        "goal_met": overhead <= OVERHEAD_GOAL,
        # Robust to the run-to-run noise of engine speed: the pipeline's wall time in which
        # its engine was not computing (the stages before the first batch, after the last).
        "engine_idle_in_pipeline": 1 - in_pipeline["utilisation"],
        "agreement": agreement(pipeline, engine),
        "pipeline_generation": in_pipeline,
        "engine_generation": engine_figures(engine, t_eng),
        "stages": spans,
    }


def report(fig: dict[str, Any]) -> None:
    secs, rates, tokens = fig["seconds"], fig["tokens_per_s"], fig["completion_tokens"]
    agree, pipe, eng = fig["agreement"], fig["pipeline_generation"], fig["engine_generation"]
    submit = ("the job's generation shards, submitted by "
              f"{fig['generation_concurrency']} threads at once" if fig["engine_submit"] == "shards"
              else "every request in one call")
    print()
    print(fig["title"])
    print(f"model {Path(fig['model']).name}, max_new_tokens {fig['max_new_tokens']}, "
          f"shard size {fig['shard_size']}, generation concurrency "
          f"{fig['generation_concurrency']}, max batch {fig['generator_max_batch']}, "
          f"torch threads {fig['torch_threads']}, no repair rounds")
    print(f"requests {fig['requests']} ({fmt_counts(fig['statuses'])}); generated "
          f"{fig['generated_requests']}, {pipe['prompt_tokens']} prompt tokens in all")
    print(f"engine alone: {submit}")
    print()
    print(f"{'run':<10} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'batch':>6} "
          f"{'busy s':>7} {'util':>6} {'queue wait':>10}")
    for name, gen in (("pipeline", pipe), ("engine", eng)):
        print(f"{name:<10} {tokens[name]:>7} {secs[name]:>8.2f} {rates[name]:>9.1f} "
              f"{gen['mean_batch_size']:>6.1f} {gen['compute_s']:>7.2f} "
              f"{gen['utilisation']:>6.1%} {gen['mean_queue_wait_s']:>9.2f}s")
    print()
    met = "yes" if fig["goal_met"] else "NO"
    print(f"pipeline overhead 1 - T_engine/T_pipeline: {fig['overhead']:.1%} "
          f"(goal <= {fig['overhead_goal']:.0%}: {met})")
    print(f"engine idle inside the pipeline (1 - its utilisation): "
          f"{fig['engine_idle_in_pipeline']:.1%} = "
          f"{secs['pipeline'] - pipe['compute_s']:.2f}s of {secs['pipeline']:.2f}s")
    print(f"engine alone vs pipeline, per request: completion tokens agree "
          f"{agree['completion_tokens']:.1%}, texts agree {agree['text']:.1%} "
          f"({agree['requests']} requests)")
    print()
    print(f"{'stage':<11} {'shard s':>7} {'first start':>11} {'last end':>9}  "
          "(shard s: its shards' durations summed, overlapping in the threads pool; "
          "start, end: seconds after admission)")
    for stage in ("router", "retrieval", "generation", "validation"):
        span = fig["stages"].get(stage)
        if span:
            print(f"{stage:<11} {span['busy_s']:>7.2f} {span['first_start_s']:>11.2f} "
                  f"{span['last_end_s']:>9.2f}")


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--requests", type=int, default=48,
                        help="requests in the timed job (default 48)")
    parser.add_argument("--shard-size", type=int, default=8, help="admission's shard size (8)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="SLUICE_MAX_NEW_TOKENS: the decoding policies' cap (default 64)")
    parser.add_argument("--engine-submit", choices=("shards", "all"), default="shards",
                        help="engine alone: the generation shards through generation_concurrency "
                             "threads (default), or every request in one call")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--timeout-s", type=float, default=1800.0,
                        help="give up on the timed job after this (default 1800)")
    parser.add_argument("--warmup-timeout-s", type=float, default=600.0)
    parser.add_argument("--poll-s", type=float, default=0.1,
                        help="how often to poll the store for the end of a job (default 0.1)")
    args = parser.parse_args(argv)
    if args.requests < 1 or not 1 <= args.shard_size <= 1024 or args.max_new_tokens < 1:
        parser.error("--requests, --shard-size (<= 1024) and --max-new-tokens must be positive")
    return args


def configure(args: argparse.Namespace, db_name: str, prefix: str, data_dir: Path) -> str:
    """bench_orchestration's environment, with the real generator and this run's knobs."""
    url = prepare_environment(db_name, prefix, data_dir, caches="off")
    os.environ.update({"SLUICE_GENERATOR_BACKEND": "transformers",
                       "SLUICE_MAX_REPAIR_ROUNDS": "0",
                       "SLUICE_MAX_NEW_TOKENS": str(args.max_new_tokens),
                       "SLUICE_SHARD_SIZE": str(args.shard_size)})
    return url


def measure(args: argparse.Namespace, bench: PipelineBench) -> dict[str, Any]:
    bench.prepare_store()
    bench.start_workers()
    warm = bench.run_job("warm-up", WARMUP_REQUESTS, args.warmup_timeout_s)
    warm_gen = bench.pipeline_generation(warm)
    if not warm_gen.calls:
        raise BenchError(f"warm-up: no request reached generation: {fmt_counts(warm.counts)}")
    job = bench.run_job("pipeline", args.requests, args.timeout_s)
    pipeline = bench.pipeline_generation(job)
    if not pipeline.calls:
        raise BenchError(f"pipeline: no request reached generation: {fmt_counts(job.counts)}")
    spans = bench.stage_spans(job)
    bench.stop_workers()  # idle workers poll Redis; give the engine alone the cores
    say("engine alone: loading the model and warming up (untimed)")
    engine = bench.engine_alone(bench.generation_records(job.job_id, set(pipeline.calls)),
                                bench.generation_records(warm.job_id, set(warm_gen.calls)))
    say(f"engine alone: {engine.tokens} tokens in {engine.seconds:.2f}s")
    return figures(args, bench, job, pipeline, engine, spans)


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def measure_and_report(bench: PipelineBench) -> None:
        fig = measure(args, bench)
        report(fig)
        if args.json is not None:
            args.json.write_text(json.dumps(fig, indent=2) + "\n", encoding="utf-8")

    return run_in_fresh_store(
        TITLE, lambda db_name, prefix, data_dir: configure(args, db_name, prefix, data_dir),
        lambda data_dir: PipelineBench(args, data_dir), measure_and_report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
