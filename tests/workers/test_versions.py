"""The version tuple is computed from settings and file hashes, never by loading a model."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tasks.generation import NullBackend
from tasks.sanitize import SANITIZER_VERSION
from tasks.tools import default_registry
from tasks.validation import VALIDATOR_VERSION, validators_version
from workers.settings import Settings
from workers.versions import current_versions, model_version, weights_hash

pytestmark = [pytest.mark.unit]

REPO = Path(__file__).resolve().parents[2]


def test_current_versions_imports_no_model_library(tmp_path: Path) -> None:
    # Given a fresh interpreter that has imported nothing yet
    script = textwrap.dedent(f"""
        import json, sys
        from workers.settings import Settings
        from workers.versions import current_versions
        settings = Settings(generator_backend="null", data_dir={str(tmp_path)!r},
                            max_new_tokens=7)
        versions = current_versions(settings, "idx-x")
        print(json.dumps({{
            "versions": versions.model_dump(),
            "torch": "torch" in sys.modules,
            "transformers": "transformers" in sys.modules,
        }}))
    """)

    # When it computes the version tuple
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})

    # Then the tuple is complete and neither torch nor transformers was imported
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["torch"] is False
    assert report["transformers"] is False
    versions = report["versions"]
    assert versions["model"] == NullBackend.model_id
    assert versions["index"] == "idx-x"
    assert versions["decoding"].startswith("decoding-") and versions["decoding"].endswith("-cap7")
    assert versions["validators"] == f"{validators_version()}+{SANITIZER_VERSION}-drop-t0.5"
    assert versions["validators"].startswith(VALIDATOR_VERSION)
    assert versions["tool_schemas"] == default_registry().version
    assert versions["router"].startswith("router-")
    assert versions["prompt"].startswith("prompts-")
    assert "torch=" in versions["runtime"]


def test_current_versions_in_process_matches_settings(tmp_path: Path) -> None:
    settings = Settings(generator_backend="null", data_dir=tmp_path, max_new_tokens=9)

    first = current_versions(settings, "idx-a")
    second = current_versions(settings, "idx-b")

    assert first.decoding.endswith("-cap9")
    assert first.index == "idx-a" and second.index == "idx-b"
    assert first.model_copy(update={"index": "idx-b"}) == second


def test_a_tool_allowlist_is_part_of_the_tool_schemas_version(tmp_path: Path) -> None:
    open_to_all = Settings(generator_backend="null", data_dir=tmp_path)
    narrowed = Settings(generator_backend="null", data_dir=tmp_path,
                        tool_allowlists={"add_ticket_note": ["acme"]})

    assert current_versions(open_to_all, "idx").tool_schemas == default_registry().version
    assert current_versions(narrowed, "idx").tool_schemas != default_registry().version


def _fake_model(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.safetensors"
    weights.write_bytes(content)
    (folder / "config.json").write_text("{}")  # not a weight file: ignored by the hash
    return weights


def test_weights_hash_is_the_sha256_of_the_weights_and_stable(tmp_path: Path) -> None:
    folder, cache = tmp_path / "FakeModel", tmp_path / "data" / "weights-hashes.json"
    _fake_model(folder, b"weights-v1" * 1000)

    first = weights_hash(folder, cache)
    second = weights_hash(folder, cache)

    assert first == hashlib.sha256(b"weights-v1" * 1000).hexdigest()[:16]
    assert second == first
    assert cache.exists()
    assert list(json.loads(cache.read_text()).values()) == [first]


def test_weights_hash_uses_the_cache_file(tmp_path: Path) -> None:
    # Given a hash already computed and cached
    folder, cache = tmp_path / "FakeModel", tmp_path / "weights-hashes.json"
    _fake_model(folder, b"weights-v1")
    weights_hash(folder, cache)

    # When the cached value is replaced behind its back
    data = json.loads(cache.read_text())
    (key,) = data
    cache.write_text(json.dumps({key: "from-the-cache"}))

    # Then the next call answers from the cache instead of re-reading the weights
    assert weights_hash(folder, cache) == "from-the-cache"


def test_weights_hash_changes_when_the_weights_change(tmp_path: Path) -> None:
    folder, cache = tmp_path / "FakeModel", tmp_path / "weights-hashes.json"
    weights = _fake_model(folder, b"weights-v1")
    before = weights_hash(folder, cache)
    old_mtime = weights.stat().st_mtime_ns

    # Same size, different bytes, and a newer mtime (as a real rewrite would leave)
    weights.write_bytes(b"weights-v2")
    os.utime(weights, ns=(old_mtime + 5_000_000_000, old_mtime + 5_000_000_000))
    after = weights_hash(folder, cache)

    assert after != before
    assert after == hashlib.sha256(b"weights-v2").hexdigest()[:16]
    assert len(json.loads(cache.read_text())) == 2


def test_weights_hash_of_a_folder_without_weights_is_missing(tmp_path: Path) -> None:
    (tmp_path / "Empty").mkdir()

    assert weights_hash(tmp_path / "Empty", tmp_path / "c.json") == "missing"
    assert weights_hash(tmp_path / "Absent", tmp_path / "c.json") == "missing"
    assert not (tmp_path / "c.json").exists()


def test_hf_model_version_is_folder_name_at_weights_hash(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "TinyLM-Instruct"
    _fake_model(folder, b"tiny weights")
    settings = Settings(generator_backend="transformers", generator_model=str(folder),
                        data_dir=tmp_path / "data")

    version = model_version(settings)

    expected_hash = hashlib.sha256(b"tiny weights").hexdigest()[:16]
    assert version == f"transformers[auto,auto]:TinyLM-Instruct@{expected_hash}"
    assert version.endswith(
        f"{folder.name}@{weights_hash(folder, settings.data_dir / 'weights-hashes.json')}")
    assert (settings.data_dir / "weights-hashes.json").exists()


def test_model_version_names_backend_variants_device_and_dtype(tmp_path: Path) -> None:
    small, large = tmp_path / "Small", tmp_path / "Large"
    _fake_model(small, b"small")
    _fake_model(large, b"large")

    one = model_version(Settings(generator_model=str(small), data_dir=tmp_path))
    two = model_version(Settings(generator_model=str(small), generator_large_model=str(large),
                                 generator_dtype="bfloat16", generator_device="cuda",
                                 data_dir=tmp_path))
    remote = model_version(Settings(generator_backend="openai", openai_model="qwen-7b",
                                    openai_base_url="http://vllm:8000/v1", data_dir=tmp_path))

    assert "|large=" not in one and two.startswith("transformers[cuda,bfloat16]:Small@")
    assert "|large=Large@" in two
    assert remote == "openai:qwen-7b@http://vllm:8000/v1"


def test_openai_backend_needs_its_server_and_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SLUICE_OPENAI_BASE_URL"):
        Settings(generator_backend="openai", data_dir=tmp_path)


def test_the_stage_gate_judges_each_requests_own_pin_in_a_shard_of_mixed_pins() -> None:
    """Drift is worked out once per distinct pin; requests that share a pin get its verdict,
    others their own: a strict drifted pin fails, a followed one proceeds with a drift event,
    a pin that matches proceeds silently, a malformed one raises."""
    from pydantic import ValidationError

    from schemas.events import EventKind
    from schemas.status import DriftPolicy, Stage, Status
    from schemas.versions import VersionTuple
    from workers.base import _decide_before_stage
    from workers.store.stage_runs import RequestState
    from workers.store.tuples import versions_id

    served = VersionTuple(model="m1", prompt="p1", router="r", index="i", tool_schemas="t",
                          validators="v", decoding="d", runtime="rt")
    old_model = served.model_copy(update={"model": "m0"}).model_dump()
    old_router = served.model_copy(update={"router": "r0"}).model_dump()

    def state(pin: dict[str, str], policy: DriftPolicy) -> RequestState:
        return RequestState(None, Status.RUNNING, 0, versions_id(pin), dict(pin), policy.value, None)

    states = {"same-a": state(served.model_dump(), DriftPolicy.STRICT),
              "strict-a": state(old_model, DriftPolicy.STRICT),
              "strict-b": state(old_model, DriftPolicy.STRICT),
              "follow": state(old_model, DriftPolicy.FOLLOW),
              "other-stage": state(old_router, DriftPolicy.STRICT),  # router is not generation's
              "same-b": state(served.model_dump(), DriftPolicy.STRICT)}
    decided, events = _decide_before_stage(Stage.GENERATION, 0, states, 1, served, 5)
    assert sorted(decided) == ["strict-a", "strict-b"]
    assert {d.outcome.error_class for d in decided.values() if d.outcome} == {"VersionDrift"}
    assert sorted((e.request_id, e.payload["policy"]) for e in events) == [
        ("follow", "follow"), ("strict-a", "strict"), ("strict-b", "strict")]
    assert all(e.kind == EventKind.DRIFT and e.payload["components"] == {
        "model": {"pinned": "m0", "served": "m1"}} for e in events)
    with pytest.raises(ValidationError):
        _decide_before_stage(Stage.GENERATION, 0, {"bad": state({"model": "m1"},
                                                               DriftPolicy.STRICT)},
                             1, served, 5)
