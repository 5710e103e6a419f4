"""Concurrent waits benchmark, NULL generator (benchmark only): what many upstream waits in
one process cost the store.

    .venv/bin/python ops/bench_waits.py [--waits N] [--rounds R]

An upstream system sends N online requests at once from threads of one process; each thread
submits its request through the Python client (`SluiceClient.submit`) and waits for its end.
Every round measures two ways of waiting, one after the other (their order alternates from
round to round):

* shared: `SluiceClient.wait`. The waits of the process share one listening connection; a
  wait reads the store when a commit's news may concern its request, and every 5 s.
* own listener: the client's wait before commit 8ef423a, kept here as the baseline. Each wait
  opens a LISTEN connection of its own, and reads the store on every commit's news and
  every 0.2 s.

For each, it prints:

* the most connections to the store this process held at once during the round (listening
  ones and the client's pool, sampled every 10 ms);
* the store reads per wait;
* the time from a request's terminal commit (its `finished_at`) to its wait's return:
  median, 95th percentile and maximum;
* the seconds from the first submit to the last return.

It ends with the ratios of the two. The setup is the orchestration benchmark's
(ops/bench_orchestration.py): a fresh Postgres database, a Redis key prefix of its own, one
worker per stage, the `null` generator, real router, retrieval and validation, both caches
warm. Everything it creates is removed at the end. Exit status: 0 when every request ended
terminal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from ops import bench_orchestration as orchestration  # noqa: E402
from ops.bench_online import online_line, spread_ms  # noqa: E402

TITLE = "Sluice concurrent waits benchmark -- NULL generator (benchmark only)"
SHARED, OWN = "shared", "own listener"
STORE_PORT = 5432


@dataclass
class Waits:
    """One way of waiting, in one round."""

    way: str
    peak_connections: int = 0
    reads: int = 0
    wake_s: list[float] = field(default_factory=list)  # terminal commit to the wait's return
    seconds: float = 0.0


def store_connections(port: int = STORE_PORT) -> int:
    """This process's established TCP connections to `port` (Linux /proc)."""
    sockets = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            sockets.add(target[len("socket:["):-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            established = fields[3] == "01"
            count += remote_port == port and established and fields[9] in sockets
    return count


class _Peak:
    """The most store connections seen by a thread that samples every `every_s`."""

    def __init__(self, every_s: float = 0.01) -> None:
        self.every_s = every_s
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, store_connections())
            self._stop.wait(self.every_s)

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_own_listener(client: Any, request_id: str, timeout_s: float,
                      poll_s: float = 0.2) -> dict[str, Any]:
    """The client's wait before commit 8ef423a: a listening connection of its own, and a
    read on every commit's news and every `poll_s`."""
    from schemas.status import Status
    from workers.store.progress import EndedListener

    deadline = time.monotonic() + timeout_s
    with EndedListener(client.settings.database_url) as ended:
        while True:
            result = client.result(request_id)
            if result is not None and Status(result["status"]).is_terminal:
                return dict(result)
            left = deadline - time.monotonic()
            if left < 0:
                raise TimeoutError(f"{request_id} not terminal after {timeout_s}s")
            ended.wait(min(poll_s, left))


def measure(way: str, tag: str, count: int, timeout_s: float) -> Waits:
    """`count` threads, each submitting one online request and waiting for it `way`."""
    from ops.client import SluiceClient

    client = SluiceClient()
    reads = [0]
    read = client.result
    lock = threading.Lock()

    def counted(request_id: str) -> dict[str, Any] | None:
        with lock:
            reads[0] += 1
        return read(request_id)

    client.result = counted  # type: ignore[method-assign]
    wait: Callable[[str], dict[str, Any]] = (
        (lambda rid: client.wait(rid, timeout_s=timeout_s)) if way == SHARED
        else (lambda rid: wait_own_listener(client, rid, timeout_s)))
    returned: dict[str, tuple[float, dict[str, Any]]] = {}
    failures: list[BaseException] = []
    start = threading.Barrier(count + 1)

    def one(n: int) -> None:
        try:
            start.wait()
            request_id = client.submit(online_line(tag, n))
            result = wait(request_id)
            returned[request_id] = (time.time(), result)
        except BaseException as exc:  # noqa: BLE001 -- reported below, in this thread
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    with _Peak() as peak:
        for thread in threads:
            thread.start()
        started = time.monotonic()
        start.wait()
        for thread in threads:
            thread.join(timeout_s + 30)
        seconds = time.monotonic() - started
    if failures:
        raise orchestration.BenchError(f"{way}: {len(failures)} waits failed, first: "
                                       f"{type(failures[0]).__name__}: {failures[0]}")
    if len(returned) != count:
        raise orchestration.BenchError(f"{way}: {count - len(returned)} waits did not return")
    return Waits(way, peak.most, reads[0], _wake_seconds(returned), seconds)


def _wake_seconds(returned: dict[str, tuple[float, dict[str, Any]]]) -> list[float]:
    """Seconds from each request's terminal commit, as the store recorded it, to its return."""
    from sqlalchemy import select

    from workers.settings import Settings
    from workers.store.engine import session_scope
    from workers.store.models import Request

    with session_scope(Settings().database_url) as session:
        ended: dict[str, datetime | None] = dict(session.execute(
            select(Request.id, Request.finished_at).where(Request.id.in_(list(returned)))).all())
    missing = [rid for rid, at in ended.items() if at is None]
    if missing or len(ended) != len(returned):
        raise orchestration.BenchError(f"requests without a terminal commit: {missing}")
    return [max(0.0, returned[rid][0] - at.timestamp()) for rid, at in ended.items()
            if at is not None]


def report(rounds: list[dict[str, Waits]], count: int) -> None:
    print(f"\n{count} concurrent waits per way and round; wake = terminal commit to return")
    print(f"{'round':<6} {'way':<13} {'peak conns':>10} {'reads/wait':>11} {'wake p50 ms':>12} "
          f"{'p95':>7} {'max':>7} {'seconds':>8}")
    for n, ways in enumerate(rounds, 1):
        for way in (SHARED, OWN):
            w = ways[way]
            p50, p95, top = spread_ms(w.wake_s)
            print(f"{n:<6} {way:<13} {w.peak_connections:>10} {w.reads / count:>11.1f} "
                  f"{p50:>12.1f} {p95:>7.1f} {top:>7.1f} {w.seconds:>8.2f}")

    def median_of(way: str, figure: Callable[[Waits], float]) -> float:
        return statistics.median(figure(r[way]) for r in rounds)

    figures: dict[str, Callable[[Waits], float]] = {
        "peak connections": lambda w: w.peak_connections,
        "reads per wait": lambda w: w.reads / count,
        "wake p50 ms": lambda w: spread_ms(w.wake_s)[0],
        "seconds": lambda w: w.seconds}
    print(f"\n{'median over rounds':<20} {SHARED:>10} {OWN:>13} {'own / shared':>13}")
    for name, figure in figures.items():
        shared, own = median_of(SHARED, figure), median_of(OWN, figure)
        ratio = f"{own / shared:.2f}x" if shared else "-"
        print(f"{name:<20} {shared:>10.1f} {own:>13.1f} {ratio:>13}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--waits", type=int, default=32,
                        help="concurrent waits per way and round (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--timeout-s", type=float, default=300.0,
                        help="give up on one wait after this (default 300)")
    args = parser.parse_args(argv)
    if min(args.waits, args.rounds) < 1:
        parser.error("--waits and --rounds must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def measure_rounds(bench: orchestration.Bench) -> None:
        rounds = []
        for n in range(args.rounds):
            order = (SHARED, OWN) if n % 2 == 0 else (OWN, SHARED)
            rounds.append({way: measure(way, f"waits-{bench.run_tag}-r{n}-{way[:3]}",
                                        args.waits, args.timeout_s) for way in order})
            bench.check_workers(0, 0)
        report(rounds, args.waits)

    return orchestration.run_on_warm_workers(TITLE, measure_rounds)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
