"""Online latency benchmark, NULL generator (benchmark only): the time of an online request
from submit to terminal, on idle workers and behind a running batch.

    .venv/bin/python ops/bench_online.py [--online N] [--batch-items M] [--shard-size S]
                                         [--rounds R]

An upstream system submits one request at a time through the Python client
(`SluiceClient.submit`, then `wait`); a batch job goes in through `submit_job`, as
`sluice submit` sends it. Each round measures N online requests sent one after another on
idle workers, then N sent one after another while a batch of M requests (shard size S) runs,
and reports the latencies' median, 95th percentile and maximum, the ratio of the medians
(behind the batch / idle), and how many of the online requests ended before the batch did.

The setup is the orchestration benchmark's (ops/bench_orchestration.py): a fresh Postgres
database, a Redis key prefix of its own, one worker per stage as `sluice run` starts them
(prefork with one child; generation a threads pool around one engine), the `null` generator
(a fixed cited sentence), real router, retrieval and validation, and both caches warm.
Everything it creates is removed at the end. Exit status: 0 when every request ended
terminal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from ops import bench_orchestration as orchestration  # noqa: E402

TITLE = "Sluice online latency benchmark -- NULL generator (benchmark only, not model latency)"


@dataclass
class Round:
    idle_s: list[float] = field(default_factory=list)
    behind_s: list[float] = field(default_factory=list)
    batch_s: float = 0.0
    before_batch: int = 0  # online requests behind the batch that ended before it did


def online_line(tag: str, n: int) -> dict[str, object]:
    return {"custom_id": f"{tag}-{n:04d}", "tenant": "acme",
            "grants": ["public", "engineering"],
            "request": {"kind": "answer", "question": orchestration.question_text(n, False)}}


def online_latencies(tag: str, count: int, timeout_s: float) -> list[tuple[float, float]]:
    """`count` online requests, one after another: (seconds from submit to terminal, the
    monotonic time it ended)."""
    from ops.client import SluiceClient
    from schemas.status import Status

    client = SluiceClient()
    timed = []
    for n in range(count):
        started = time.monotonic()
        request_id = client.submit(online_line(tag, n))
        result = client.wait(request_id, timeout_s=timeout_s)
        ended = time.monotonic()
        if not Status(result["status"]).is_terminal:
            raise orchestration.BenchError(f"{request_id} ended {result['status']}")
        timed.append((ended - started, ended))
    return timed


def measure_round(bench: orchestration.Bench, n: int, args: argparse.Namespace) -> Round:
    from ops.jobs import submit_job, wait_for_job
    from workers.settings import Settings

    round_ = Round()
    tag = f"online-{bench.run_tag}-r{n}"
    round_.idle_s = [s for s, _ in online_latencies(f"{tag}-idle", args.online, args.timeout_s)]
    batch_file = orchestration.write_job_file(bench.jobs_dir, f"{tag}-batch", args.batch_items)
    started = time.monotonic()
    admitted = submit_job(Settings(shard_size=args.shard_size), batch_file)
    behind = online_latencies(f"{tag}-behind", args.online, args.timeout_s)
    if not wait_for_job(Settings(), admitted.job_id, bench.check_workers,
                        timeout_s=args.timeout_s):
        raise orchestration.BenchError(f"batch {admitted.job_id} not done after "
                                       f"{args.timeout_s:.0f}s")
    batch_ended = time.monotonic()
    round_.batch_s = batch_ended - started
    round_.behind_s = [s for s, _ in behind]
    round_.before_batch = sum(1 for _, ended in behind if ended < batch_ended)
    return round_


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value at or above a fraction `q` of them."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def spread_ms(seconds: list[float]) -> tuple[float, float, float]:
    """Median, 95th percentile and maximum, in milliseconds."""
    ms = [1000 * s for s in seconds]
    return statistics.median(ms), percentile(ms, 0.95), max(ms)


def report(rounds: list[Round], args: argparse.Namespace) -> dict[str, object]:
    print(f"\n{args.online} online requests per setting and round, batch of {args.batch_items} "
          f"at shard {args.shard_size}; milliseconds from submit to terminal")
    print(f"{'round':<7} {'idle p50':>9} {'p95':>7} {'max':>7} {'behind p50':>11} {'p95':>7} "
          f"{'max':>7} {'ratio p50':>10} {'batch s':>8} {'before batch':>13}")
    ratios = []
    for n, r in enumerate(rounds, 1):
        idle, behind = spread_ms(r.idle_s), spread_ms(r.behind_s)
        ratios.append(behind[0] / idle[0])
        print(f"{n:<7} {idle[0]:>9.0f} {idle[1]:>7.0f} {idle[2]:>7.0f} {behind[0]:>11.0f} "
              f"{behind[1]:>7.0f} {behind[2]:>7.0f} {ratios[-1]:>9.2f}x {r.batch_s:>8.2f} "
              f"{r.before_batch:>8}/{len(r.behind_s)}")
    idle = spread_ms([s for r in rounds for s in r.idle_s])
    behind = spread_ms([s for r in rounds for s in r.behind_s])
    before, online_behind = sum(r.before_batch for r in rounds), args.online * len(rounds)
    print(f"all rounds: idle p50 {idle[0]:.0f} ms, p95 {idle[1]:.0f} ms; behind the batch "
          f"p50 {behind[0]:.0f} ms, p95 {behind[1]:.0f} ms; median ratio "
          f"{statistics.median(ratios):.2f}x; {before} of {online_behind} ended before "
          f"their batch")
    return {"idle_ms": dict(zip(("p50", "p95", "max"), idle, strict=True)),
            "behind_batch_ms": dict(zip(("p50", "p95", "max"), behind, strict=True)),
            "ratio_p50_median": statistics.median(ratios), "before_batch": before,
            "online_behind": online_behind}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--online", type=int, default=8,
                        help="online requests per setting and round (default 8)")
    parser.add_argument("--batch-items", type=int, default=2048,
                        help="requests of the batch job each round (default 2048)")
    parser.add_argument("--shard-size", type=int, default=64,
                        help="the batch's shard size (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="give up on one request or batch after this (default 600)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if min(args.online, args.batch_items, args.shard_size, args.rounds) < 1:
        parser.error("--online, --batch-items, --shard-size and --rounds must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def measure(bench: orchestration.Bench) -> None:
        rounds = [measure_round(bench, n, args) for n in range(args.rounds)]
        summary = report(rounds, args)
        if args.json is not None:
            args.json.write_text(json.dumps({"rounds": [r.__dict__ for r in rounds],
                                             **summary}, indent=2))

    return orchestration.run_on_warm_workers(TITLE, measure)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
