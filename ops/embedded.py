"""The embedded mode: one worker process per queue, started and stopped by the command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from pydantic import SecretStr

from schemas.status import Stage
from workers.queues import stage_queues
from workers.settings import Settings


class WorkerDied(RuntimeError):
    """A worker the command started exited; its log says why."""


class WorkerFleet:
    """`sluice worker` processes, one per stage, sharing this process's settings."""

    def __init__(self, settings: Settings, log_dir: Path, concurrency: int = 1) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.concurrency = concurrency
        self.processes: dict[Stage, subprocess.Popen[bytes]] = {}

    def start(self, stages: list[Stage] | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for stage in stages or list(Stage):
            self.processes[stage] = start_worker(self.settings, stage, self.log_dir,
                                                 self.concurrency)

    def raise_if_dead(self) -> None:
        for stage, process in self.processes.items():
            if process.poll() is not None:
                log = self.log_dir / f"worker-{stage.value}.log"
                raise WorkerDied(f"the {stage.value} worker exited with code "
                                 f"{process.returncode}; see {log}")

    def stop(self, timeout_s: float = 20) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def __enter__(self) -> WorkerFleet:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def worker_env(settings: Settings) -> dict[str, str]:
    """This process's environment plus every setting, so workers see exactly these."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        secret = getattr(settings, name)
        if isinstance(secret, SecretStr):  # dumped as "**********"
            value = secret.get_secret_value()
        if value is None:  # unset here, so unset there ("null" would read back as text)
            env.pop(f"SLUICE_{name.upper()}", None)
            continue
        env[f"SLUICE_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    env.update({"OMP_NUM_THREADS": str(settings.torch_threads),
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    return env


def worker_pool(settings: Settings, stage: Stage, concurrency: int = 1) -> tuple[str, int]:
    """The Celery pool of a stage's worker: generation runs threads, so that its concurrent
    tasks share one model and one batching engine (which then enforces deadlines itself);
    the other stages run prefork children."""
    if stage == Stage.GENERATION:
        return "threads", settings.generation_concurrency
    return "prefork", concurrency


def celery_worker_command(settings: Settings, stage: Stage, concurrency: int,
                          name: str) -> list[str]:
    """The `celery worker` command line that serves `stage`'s queues (online first), under
    `nice` when the stage runs at a lower CPU priority (see `Settings.stage_nice_step`)."""
    pool, concurrency = worker_pool(settings, stage, concurrency)
    nice = settings.stage_nice(stage)
    return ([shutil.which("nice") or "nice", "-n", str(nice)] if nice else []) + [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker",
        "-Q", ",".join(stage_queues(stage)), "-c", str(concurrency), "-P", pool,
        "-n", name, "--loglevel", "INFO"]


def start_worker(settings: Settings, stage: Stage, log_dir: Path,
                 concurrency: int = 1) -> subprocess.Popen[bytes]:
    log_path = log_dir / f"worker-{stage.value}.log"
    command = celery_worker_command(settings, stage, concurrency,
                                    f"{stage.value}-{os.getpid()}@%h")
    command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    with log_path.open("ab") as log:
        return subprocess.Popen(command, env=worker_env(settings), stdout=log,
                                stderr=subprocess.STDOUT)
