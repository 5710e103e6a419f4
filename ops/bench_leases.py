"""Lease renewal overhead per stage: the process's lease keeper against a thread per stage.

    .venv/bin/python ops/bench_leases.py [--stages N] [--rounds R]

A stage task holds its shard stage's lease while it computes. This measures what holding
costs a stage that computes nothing, in wall time: entering and leaving
`LeaseKeeper.holding` (workers/leases.py), against starting a renewal thread on entry and
stopping and joining it on exit (the design before the keeper, rebuilt here as the
baseline). Both run in the same process, interleaved, in two settings: a quiet process, and
one where another thread keeps the interpreter busy, as a threads pool's other tasks or a
generation engine's scheduler do. The lease is long (15 s), so no renewal falls inside a
measurement and no database is needed. Prints microseconds per stage and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from workers.leases import LeaseKeeper  # noqa: E402
from workers.store.stage_runs import LeaseOwner  # noqa: E402

LEASE_S = 15.0
URL = "postgresql://unused"  # no renewal is due within a measurement
Hold = Callable[[str, int, LeaseOwner, float], AbstractContextManager[None]]


@contextmanager
def thread_per_stage(url: str, lease_id: int, owner: LeaseOwner,
                     lease_s: float) -> Iterator[None]:
    """The baseline: a renewal thread of the stage's own (renewing nothing here)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(lease_s / 3):
            pass

    thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=lease_s)


def per_stage_us(hold: Hold, stages: int) -> float:
    """Microseconds of wall time per stage to enter and leave `hold` with nothing inside."""
    owner = LeaseOwner("bench", 1, "task")
    started = time.perf_counter()
    for lease_id in range(stages):
        with hold(URL, lease_id, owner, LEASE_S):
            pass
    return (time.perf_counter() - started) / stages * 1e6


def busy_thread() -> threading.Event:
    """A thread that keeps the interpreter busy until the returned event is set."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    threading.Thread(target=spin, name="busy", daemon=True).start()
    return stop


def main(argv: list[str]) -> int:
    """Measure both ways of holding a lease in both settings and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=200, help="stages per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args(argv)
    if args.stages < 1 or args.rounds < 1:
        parser.error("--stages and --rounds must be positive")
    keeper = LeaseKeeper()
    print(f"{'setting':<18} {'thread per stage':>18} {'keeper':>10} {'ratio':>10}")
    for setting in ("quiet", "one busy thread"):
        stop = busy_thread() if setting != "quiet" else None
        baseline, kept = [], []
        for _ in range(args.rounds):
            baseline.append(per_stage_us(thread_per_stage, args.stages))
            kept.append(per_stage_us(keeper.holding, args.stages))
        if stop is not None:
            stop.set()
        base_us, keeper_us = statistics.median(baseline), statistics.median(kept)
        print(f"{setting:<18} {base_us:>15.1f} us {keeper_us:>7.1f} us "
              f"{base_us / keeper_us:>9.0f}x")
    print("(wall time per stage to enter and leave holding a lease; median of rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
