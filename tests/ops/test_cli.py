"""`sluice run` on the embedded default, from the command line, as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SMALL = ROOT / "ops" / "examples" / "jobs" / "small.jsonl"


def _embedded_env(data_dir: Path) -> dict[str, str]:
    """No Redis, no Postgres: drop what conftest points at them."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SLUICE_DATABASE_URL", "SLUICE_BROKER_URL", "SLUICE_BROKER_KEY_PREFIX")}
    env.update({"SLUICE_DATA_DIR": str(data_dir), "SLUICE_MAX_NEW_TOKENS": "32",
                "SLUICE_SHARD_SIZE": "32"})
    return env


def _sluice(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "sluice"), *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def _stage_runs(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "audit.db") as conn:
        return int(conn.execute("select count(*) from stage_runs").fetchone()[0])


def test_sluice_run_embedded_writes_every_line_once_and_resumes(tmp_path: Path) -> None:
    data_dir, out = tmp_path / "data", tmp_path / "out"
    env = _embedded_env(data_dir)
    # Given the example file with a malformed line, on the embedded default
    first = _sluice("run", str(SMALL), "--out", str(out), env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    # Then every input line is in exactly one output file
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    input_lines = [x for x in SMALL.read_text().splitlines() if x.strip()]
    assert len(results) + len(errors) == len(input_lines)
    assert [e["error_class"] for e in errors].count("MalformedLine") == 1
    assert "ingested the example corpus" in first.stderr
    assert "latency" in first.stderr and "tokens" in first.stderr
    # And a request's trail shows its pin, and resolves the tuple its admission event names
    trail = _sluice("audit", results[0]["request_id"], "--json", env=env, cwd=tmp_path)
    assert trail.returncode == 0, trail.stderr[-3000:]
    shown = json.loads(trail.stdout)
    assert shown["request"]["pinned_versions"] == results[0]["versions"]
    admitted = next(e for e in shown["events"] if e["kind"] == "admitted")
    assert shown["version_tuples"][admitted["payload"]["versions_id"]] == results[0]["versions"]
    # And the failed ones are listed, whole ids first (to paste into audit and replay)
    failed_ids = sorted(e["request_id"] for e in errors if e["status"] == "failed")
    listed = _sluice("failed", "--json", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert sorted(r["request_id"] for r in json.loads(listed.stdout)) == failed_ids
    lines = _sluice("failed", env=env, cwd=tmp_path)
    assert f"{len(failed_ids)} failed request(s)" in lines.stderr
    assert [line.split()[0] for line in lines.stdout.splitlines()[::2]] == [
        r["request_id"] for r in json.loads(listed.stdout)]
    runs_before = _stage_runs(data_dir)
    # When the same file runs again
    second = _sluice("run", str(SMALL), "--out", str(out), "--no-workers", env=env, cwd=tmp_path)
    # Then nothing is redone and the outputs are the same
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed, 0 shard(s) enqueued" in second.stderr
    assert _stage_runs(data_dir) == runs_before
    again = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    changed = [(a.get("custom_id"), k, a.get(k), b.get(k)) for a, b in zip(again, results, strict=True)
               for k in set(a) | set(b) if a.get(k) != b.get(k)]
    assert not changed, f"outputs changed between the runs: {changed}"


def test_sluice_run_reports_a_missing_file_clearly(tmp_path: Path) -> None:
    result = _sluice("run", str(tmp_path / "nope.jsonl"), env=_embedded_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    assert "job file not found" in result.stderr


@pytest.mark.parametrize(("content", "message"), [
    (None, "a folder, not a job file"), ("", "the job file has no lines"),
    ("\n  \n\n", "the job file has no lines")])
def test_sluice_run_and_submit_refuse_a_job_file_with_nothing_to_run(
        tmp_path: Path, content: str | None, message: str) -> None:
    job = tmp_path / "job.jsonl"
    if content is None:
        job.mkdir()
    else:
        job.write_text(content)
    env = _embedded_env(tmp_path / "data")

    for command in (("run", str(job)), ("submit", str(job))):
        result = _sluice(*command, env=env, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.strip() == f"error: {message}: {job}"
    assert not (tmp_path / "data").exists()  # no store, no index, no worker


def test_sluice_run_refuses_an_unusable_out_before_any_work(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    result = _sluice("run", str(SMALL), "--out", str(taken / "out"),
                     env=_embedded_env(tmp_path / "data"), cwd=tmp_path)

    assert result.returncode == 1
    assert result.stderr.strip() == f"error: cannot write results to {taken / 'out'}: Not a directory"
    assert not (tmp_path / "data").exists()  # no store, no index, no worker


def _celery_children(pid: int) -> list[int]:
    """The celery processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if parent == pid and b"celery" in cmdline:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 128 + signal.SIGTERM),
                                               (signal.SIGINT, 130)])
def test_a_stop_signal_stops_sluice_run_and_its_workers(tmp_path: Path, signum: int,
                                                        status: int) -> None:
    env = {**_embedded_env(tmp_path / "data"), "SLUICE_GENERATOR_BACKEND": "null"}
    command = [str(Path(sys.executable).parent / "sluice"), "run", str(SMALL), "--out",
               str(tmp_path / "out")]
    run = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    # Given the command with its four workers up
    deadline, workers = time.monotonic() + 600, []
    while time.monotonic() < deadline and run.poll() is None and len(workers) < 4:
        time.sleep(0.5)
        workers = _celery_children(run.pid)
    assert len(workers) == 4, run.stderr.read() if run.poll() is not None else "no workers"
    # When it is sent SIGTERM (a `timeout`, a cancelled CI job) or SIGINT (Ctrl-C)
    run.send_signal(signum)
    exited = run.wait(timeout=120)
    # Then it stops its workers before it exits
    stderr = run.stderr.read()
    assert exited == status, stderr[-3000:]
    assert [pid for pid in workers if Path(f"/proc/{pid}").exists()] == []
    if signum == signal.SIGINT:
        assert "interrupted; run the same command again to resume" in stderr


@pytest.mark.parametrize("command", [("audit", "req-x"), ("failed",), ("status", "job-x"),
                                     ("results", "job-x"), ("cancel", "job-x"),
                                     ("replay", "req-x"), ("reconcile", "--once"),
                                     ("worker", "--queue", "router"), ("versions",)])
def test_operator_commands_on_a_missing_store_say_what_to_do(tmp_path: Path,
                                                              command: tuple[str, ...]) -> None:
    result = _sluice(*command, env=_embedded_env(tmp_path), cwd=tmp_path)

    assert result.returncode == 1
    assert "no audit store at" in result.stderr and "sluice db upgrade" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "audit.db").exists()


@pytest.mark.parametrize("command", [("status", "job-x"), ("worker", "--queue", "router"),
                                     ("run", str(SMALL))])
def test_a_bad_setting_exits_2_naming_its_variable_and_not_the_secrets(
        tmp_path: Path, command: tuple[str, ...]) -> None:
    secret = "sk-live-0123456789abcdef"
    env = {**_embedded_env(tmp_path), "SLUICE_LEASE_S": "-1", "SLUICE_OPENAI_API_KEY": secret}
    result = _sluice(*command, env=env, cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.strip() == ("configuration error: SLUICE_LEASE_S: Input should be "
                                     "greater than 0")
    assert secret not in result.stdout + result.stderr


def test_an_unmigrated_store_and_bracketed_values_come_back_as_one_line_each(
        tmp_path: Path) -> None:
    env = _embedded_env(tmp_path)
    (tmp_path / "audit.db").touch()
    unmigrated = _sluice("audit", "req-x", env=env, cwd=tmp_path)
    assert unmigrated.returncode == 1
    assert "has no schema: run `sluice db upgrade`" in unmigrated.stderr

    assert _sluice("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    bracketed = _sluice("audit", "req-[/b][S1]", env=env, cwd=tmp_path)
    assert bracketed.returncode == 1
    # rich would read the brackets as markup: dropped, or a MarkupError traceback
    assert bracketed.stderr.strip() == "error: no request with id 'req-[/b][S1]'"


def test_status_of_a_job_of_malformed_lines_counts_them(tmp_path: Path) -> None:
    # Given a job file whose every line is malformed, submitted: there is nothing to enqueue
    env = _embedded_env(tmp_path)
    job = tmp_path / "bad.jsonl"
    job.write_text('{"custom_id": "a"}\nnot json\n', encoding="utf-8")
    submitted = _sluice("submit", str(job), env=env, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.split()[0]
    # When its status is asked for, it is found, with its malformed lines
    shown = _sluice("status", job_id, env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert json.loads(shown.stdout) == {"malformed": 2}
    missing = _sluice("status", "job-0000", env=env, cwd=tmp_path)
    assert missing.returncode == 1 and "no job with id 'job-0000'" in missing.stderr


def test_sluice_worker_runs_an_earlier_stage_at_a_lower_cpu_priority(tmp_path: Path) -> None:
    # `sluice worker` becomes the Celery worker under `nice`, by its stage
    # (SLUICE_STAGE_NICE_STEP): the router, three stages before validation, three steps up.
    env = {**_embedded_env(tmp_path / "data"), "SLUICE_STAGE_NICE_STEP": "1"}
    assert _sluice("db", "upgrade", env=env, cwd=tmp_path).returncode == 0  # a worker needs a store
    command = [str(Path(sys.executable).parent / "sluice"), "worker", "--queue", "router"]
    worker = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)

    def celery_argv() -> list[bytes]:
        try:
            argv = Path(f"/proc/{worker.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # exited
            return []
        return argv if b"celery" in argv and Path(argv[0].decode()).name != "nice" else []

    try:
        for _ in range(300):  # until both execs are done: sluice -> nice -> the Celery worker
            if celery_argv() or worker.poll() is not None:
                break
            time.sleep(0.1)
        assert celery_argv(), f"sluice worker did not exec the Celery worker ({worker.poll()})"
        assert os.getpriority(os.PRIO_PROCESS, worker.pid) == os.getpriority(
            os.PRIO_PROCESS, 0) + 3
    finally:
        worker.terminate()
        worker.wait(timeout=60)
