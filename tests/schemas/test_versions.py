"""The version tuple's drift check, stage order and terminal statuses."""

from __future__ import annotations

import pytest

from schemas.status import RESULT_STATUSES, TERMINAL_STATUSES, Stage, Status
from schemas.versions import STAGE_COMPONENTS, VersionTuple

pytestmark = [pytest.mark.unit]


def _pin(**overrides: str) -> VersionTuple:
    values = {
        "model": "SmolLM2@aaaa", "prompt": "prompt-1", "router": "router-1", "index": "idx-1",
        "tool_schemas": "tools-none", "validators": "answer-contract-1",
        "decoding": "greedy-max128", "runtime": "torch=2",
    }
    values.update(overrides)
    return VersionTuple(**values)


def test_identical_tuples_have_no_drift_at_any_stage() -> None:
    pin = _pin()
    for stage in Stage:
        assert pin.drift(_pin(), stage) == {}


def test_prompt_change_is_drift_for_generation_only() -> None:
    # Given a request pinned on prompt-1 and a worker serving prompt-2
    pin, served = _pin(), _pin(prompt="prompt-2")

    # When each stage checks for drift
    # Then only the generation stage, which uses the prompt, sees it
    assert pin.drift(served, Stage.GENERATION) == {"prompt": ("prompt-1", "prompt-2")}
    assert pin.drift(served, Stage.ROUTER) == {}
    assert pin.drift(served, Stage.RETRIEVAL) == {}
    assert pin.drift(served, Stage.VALIDATION) == {}


def test_drift_reports_only_the_stage_components() -> None:
    served = _pin(model="other@bbbb", router="router-2", index="idx-2", validators="v2",
                  decoding="greedy-max5", runtime="torch=3", tool_schemas="tools-x")
    pin = _pin()

    assert pin.drift(served, Stage.ROUTER) == {"router": ("router-1", "router-2")}
    assert pin.drift(served, Stage.RETRIEVAL) == {"index": ("idx-1", "idx-2"),
                                                  "validators": ("answer-contract-1", "v2"),
                                                  "tool_schemas": ("tools-none", "tools-x")}
    assert pin.drift(served, Stage.GENERATION) == {
        "model": ("SmolLM2@aaaa", "other@bbbb"),
        "decoding": ("greedy-max128", "greedy-max5"),
    }
    assert pin.drift(served, Stage.VALIDATION) == {"validators": ("answer-contract-1", "v2")}
    for stage in Stage:
        assert set(pin.drift(served, stage)) <= set(STAGE_COMPONENTS[stage])


def test_every_stage_has_components() -> None:
    assert set(STAGE_COMPONENTS) == set(Stage)


def test_stage_next_follows_chain_order() -> None:
    assert Stage.ROUTER.next is Stage.RETRIEVAL
    assert Stage.RETRIEVAL.next is Stage.GENERATION
    assert Stage.GENERATION.next is Stage.VALIDATION
    assert Stage.VALIDATION.next is None


@pytest.mark.parametrize("status,terminal", [
    (Status.QUEUED, False), (Status.RUNNING, False), (Status.SUCCEEDED, True),
    (Status.ABSTAINED, True), (Status.REFUSED, True), (Status.NEEDS_CLARIFICATION, True),
    (Status.FAILED, True),
])
def test_status_is_terminal(status: Status, terminal: bool) -> None:
    assert status.is_terminal is terminal
    assert (status in TERMINAL_STATUSES) is terminal


def test_failed_is_terminal_but_not_a_result() -> None:
    assert Status.FAILED not in RESULT_STATUSES
    assert Status.SUCCEEDED in RESULT_STATUSES
