"""Settings: refused with a message that names the variable, never the value; stage limits
and the visibility timeout checked against each other."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from workers.settings import ConfigurationError, Settings, describe_settings_error

pytestmark = pytest.mark.unit

SECRET = "sk-live-abcdef0123456789"
ROOT = Path(__file__).resolve().parents[2]


def _refusal(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(f"SLUICE_{name.upper()}", value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    return describe_settings_error(refused.value)


def test_a_refused_setting_names_its_variable_and_not_the_secrets_beside_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    message = _refusal(monkeypatch, generator_backend="openai", openai_base_url="http://x",
                       openai_api_key=SECRET)

    assert message == "the openai backend needs SLUICE_OPENAI_BASE_URL and SLUICE_OPENAI_MODEL"
    assert SECRET not in message and "input" not in message


def test_a_field_error_is_told_by_its_environment_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    message = _refusal(monkeypatch, shard_size="0", openai_api_key=SECRET)

    assert message == "SLUICE_SHARD_SIZE: Input should be greater than 0"


@pytest.mark.parametrize("limits", ["[60, -30]", "[60, 60]", "[0, 10]"])
def test_stage_limits_must_be_a_soft_limit_under_a_hard_one(
        monkeypatch: pytest.MonkeyPatch, limits: str) -> None:
    message = _refusal(monkeypatch, limits__router=limits)

    assert message.startswith("SLUICE_LIMITS: router's limits must be (soft, hard) seconds")


def test_the_visibility_timeout_must_outlast_every_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _refusal(monkeypatch, visibility_timeout_s="900")

    assert "SLUICE_VISIBILITY_TIMEOUT_S must exceed every stage's hard time limit" in message
    assert "960" in message  # generation's default hard limit


def test_tool_allowlists_are_read_as_json_and_unknown_tools_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_TOOL_ALLOWLISTS", '{"add_ticket_note": ["acme"]}')
    assert Settings().tool_allowlists == {"add_ticket_note": frozenset({"acme"})}

    message = _refusal(monkeypatch, tool_allowlists='{"drop_tables": ["acme"]}')

    assert message.startswith("SLUICE_TOOL_ALLOWLISTS: allowlists name unknown tools "
                              "['drop_tables']")


def test_a_worker_or_flower_started_with_a_bad_setting_names_it_and_not_the_secrets(
        tmp_path: Path) -> None:
    # Celery workers and Flower load the app module, which reads the settings at import
    env = {**os.environ, "SLUICE_GENERATOR_BACKEND": "openai", "SLUICE_OPENAI_API_KEY": SECRET,
           "SLUICE_DATA_DIR": str(tmp_path)}
    started = subprocess.run([sys.executable, "-c", "import workers.app"], env=env,
                             capture_output=True, text=True, timeout=120, cwd=ROOT)

    assert started.returncode == 1
    assert ("ConfigurationError: the openai backend needs SLUICE_OPENAI_BASE_URL and "
            "SLUICE_OPENAI_MODEL") in started.stderr
    assert SECRET not in started.stderr + started.stdout


def test_the_client_refuses_a_bad_setting_without_repeating_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ops.client import SluiceClient

    monkeypatch.setenv("SLUICE_DATABASE_URL", f"postgresql://sluice:{SECRET}@db/sluice")
    monkeypatch.setenv("SLUICE_LEASE_S", "-1")
    with pytest.raises(ConfigurationError) as refused:
        SluiceClient()

    assert str(refused.value) == "SLUICE_LEASE_S: Input should be greater than 0"
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


def test_the_client_refuses_a_store_that_is_not_there_and_does_not_create_one(
        tmp_path: Path) -> None:
    from ops.client import SluiceClient
    from workers.store.migrate import StoreNotReady

    with pytest.raises(StoreNotReady, match="no audit store at"):
        SluiceClient(Settings(data_dir=tmp_path, database_url=""))

    assert not (tmp_path / "audit.db").exists()
