"""docker-compose.yml, the distributed mode: its services, their order and guards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.status import Stage

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "docker-compose.yml"
pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compose(compose_text: str) -> dict[str, Any]:
    loaded = yaml.safe_load(compose_text)
    assert isinstance(loaded, dict), "docker-compose.yml is not a mapping"
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found = compose.get("services")
    assert isinstance(found, dict) and found, "docker-compose.yml has no services"
    return found


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _workers_by_stage(services: dict[str, Any]) -> dict[Stage, list[str]]:
    """Service names whose command is `... worker --queue <stage>`, by stage."""
    found: dict[Stage, list[str]] = {stage: [] for stage in Stage}
    for name, service in services.items():
        command = _command(service)
        if "worker" not in command or "--queue" not in command:
            continue
        index = command.index("--queue")
        if index + 1 < len(command) and command[index + 1] in set(Stage):
            found[Stage(command[index + 1])].append(name)
    return found


def test_compose_file_parses(compose: dict[str, Any]) -> None:
    assert "services" in compose
    assert isinstance(compose["services"], dict)


@pytest.mark.parametrize("name", ["redis", "postgres", "migrate", "flower"])
def test_infrastructure_service_exists(services: dict[str, Any], name: str) -> None:
    assert name in services, f"service {name!r} missing"


def test_migrate_runs_the_upgrade_once(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert _command(migrate)[-2:] == ["db", "upgrade"]
    assert str(migrate.get("restart")) == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("stage", list(Stage), ids=[s.value for s in Stage])
def test_one_worker_per_stage(services: dict[str, Any], stage: Stage) -> None:
    workers = _workers_by_stage(services)[stage]
    assert len(workers) == 1, f"want one worker service for --queue {stage.value}, got {workers}"
    command = _command(services[workers[0]])
    assert command[command.index("--queue") + 1] == stage.value


@pytest.mark.parametrize("stage", list(Stage), ids=[s.value for s in Stage])
def test_worker_waits_for_its_dependencies(services: dict[str, Any], stage: Stage) -> None:
    workers = _workers_by_stage(services)[stage]
    assert workers, f"no worker service for --queue {stage.value}"
    depends_on = services[workers[0]].get("depends_on")
    assert isinstance(depends_on, dict), f"{workers[0]}: depends_on needs conditions"
    assert depends_on.get("redis", {}).get("condition") == "service_healthy"
    assert depends_on.get("postgres", {}).get("condition") == "service_healthy"
    assert depends_on.get("migrate", {}).get("condition") == "service_completed_successfully"


@pytest.mark.parametrize("name", ["redis", "postgres"])
def test_backing_service_has_healthcheck(services: dict[str, Any], name: str) -> None:
    healthcheck = services[name].get("healthcheck")
    assert isinstance(healthcheck, dict), f"{name} has no healthcheck"
    assert healthcheck.get("test"), f"{name}'s healthcheck has no test"
    assert not healthcheck.get("disable", False)


def test_generation_worker_reserves_a_gpu(services: dict[str, Any]) -> None:
    workers = _workers_by_stage(services)[Stage.GENERATION]
    assert workers, "no generation worker service"
    devices = (services[workers[0]].get("deploy", {}).get("resources", {})
               .get("reservations", {}).get("devices", []))
    assert any("gpu" in device.get("capabilities", []) and device.get("driver") == "nvidia"
               for device in devices), f"{workers[0]} reserves no GPU: {devices}"


def test_required_variables_are_guarded(compose_text: str, services: dict[str, Any]) -> None:
    assert ":?" in compose_text
    password = str(services["postgres"]["environment"]["POSTGRES_PASSWORD"])
    assert password.startswith("${POSTGRES_PASSWORD:?"), password
