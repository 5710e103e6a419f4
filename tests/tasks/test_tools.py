"""The tool registry and planner: validation before any call, allowlists, side-effect keys."""

from __future__ import annotations

import pytest

from schemas.stages import RetrievedChunk
from tasks.tools import (
    SHIPPED_TOOLS,
    ListOpenTicketsArgs,
    ToolArgumentError,
    ToolCall,
    ToolNotAllowed,
    ToolOutput,
    ToolRegistry,
    ToolSpec,
    UnknownTool,
    default_registry,
    error_result,
    ok_result,
    plan_tool_call,
)

pytestmark = pytest.mark.unit
GRANTS = frozenset({"public", "engineering"})  # the example tickets' folder is engineering


@pytest.fixture(scope="module")
def registry() -> ToolRegistry:
    return default_registry()


def test_the_shipped_registry_holds_the_four_tools_with_their_contracts(
        registry: ToolRegistry) -> None:
    specs = {spec.name: spec for spec in registry.specs}

    assert sorted(specs) == ["add_ticket_note", "current_time", "get_ticket", "list_open_tickets"]
    assert [name for name, spec in specs.items() if spec.side_effects] == ["add_ticket_note"]
    assert all(spec.timeout_s > 0 and spec.version for spec in specs.values())
    assert registry.version.startswith("tools-")


def test_a_valid_call_is_normalised_and_gets_a_stable_id(registry: ToolRegistry) -> None:
    first = registry.validate("acme", ToolCall(tool="get_ticket", args={"ticket_id": " inc-2057"}),
                              GRANTS)
    again = registry.validate("acme", ToolCall(tool="get_ticket", args={"ticket_id": "INC-2057"}),
                              GRANTS)
    other_tenant = registry.validate("globex", ToolCall(tool="get_ticket",
                                                        args={"ticket_id": "INC-2057"}), GRANTS)
    other_grants = registry.validate("acme", ToolCall(tool="get_ticket",
                                                      args={"ticket_id": "INC-2057"}), {"public"})

    assert first.args_json == {"ticket_id": "INC-2057"}
    assert first.call_id == again.call_id
    assert first.call_id != other_tenant.call_id
    # A result read under some grants is never served, by its id, to a caller with others
    assert other_grants.grants == {"public"} and other_grants.call_id != first.call_id


@pytest.mark.parametrize(("call", "message"), [
    (ToolCall(tool="get_ticket", args={"ticket_id": "2057; DROP TABLE tickets"}),
     "get_ticket arguments are invalid: ticket_id: String should match pattern "
     "'^INC-[0-9]{3,8}$' (got '2057; DROP TABLE tickets')"),
    (ToolCall(tool="get_ticket", args={}),
     "get_ticket arguments are invalid: ticket_id: Field required (got {})"),
    (ToolCall(tool="list_open_tickets", args={"limit": 500}),
     "list_open_tickets arguments are invalid: limit: Input should be less than or equal to 50 "
     "(got 500)"),
    (ToolCall(tool="current_time", args={"zone": "UTC"}),
     "current_time arguments are invalid: zone: Extra inputs are not permitted (got 'UTC')"),
    (ToolCall(tool="add_ticket_note", args={"ticket_id": "INC-2057", "note": "  "},
              idempotency_key="k1"),
     "add_ticket_note arguments are invalid: note: String should have at least 1 character "
     "(got '  ')"),
])
def test_invalid_arguments_are_rejected_with_a_precise_message(
        registry: ToolRegistry, call: ToolCall, message: str) -> None:
    with pytest.raises(ToolArgumentError) as caught:
        registry.validate("acme", call, GRANTS)

    assert str(caught.value) == message


def test_a_side_effect_tool_needs_an_idempotency_key(registry: ToolRegistry) -> None:
    call = ToolCall(tool="add_ticket_note", args={"ticket_id": "INC-2057", "note": "paged"})

    with pytest.raises(ToolArgumentError, match="add_ticket_note has side effects and needs an "
                                                "idempotency key, got None"):
        registry.validate("acme", call, GRANTS)
    keyed = registry.validate("acme", call.model_copy(update={"idempotency_key": "note-1"}), GRANTS)
    other_key = registry.validate("acme", call.model_copy(update={"idempotency_key": "note-2"}),
                                  GRANTS)

    assert keyed.idempotency_key == "note-1"
    assert keyed.call_id != other_key.call_id


def test_a_read_only_call_ignores_an_idempotency_key(registry: ToolRegistry) -> None:
    plain = registry.validate("acme", ToolCall(tool="current_time"), GRANTS)
    keyed = registry.validate("acme", ToolCall(tool="current_time", idempotency_key="k"), GRANTS)

    assert keyed.idempotency_key is None
    assert keyed.call_id == plain.call_id


def test_the_allowlist_is_enforced_per_tenant() -> None:
    registry = default_registry({"add_ticket_note": frozenset({"acme"})})
    call = ToolCall(tool="add_ticket_note", args={"ticket_id": "INC-3112", "note": "x"},
                    idempotency_key="k")

    with pytest.raises(ToolNotAllowed, match="tenant 'globex' may not call tool 'add_ticket_note'"):
        registry.validate("globex", call, GRANTS)
    assert registry.validate("acme", call, GRANTS).tenant == "acme"
    assert registry.version != default_registry().version  # the allowlist is part of the contract


def test_unknown_tools_and_bad_specs_are_refused(registry: ToolRegistry) -> None:
    with pytest.raises(UnknownTool, match="unknown tool 'delete_ticket'"):
        registry.validate("acme", ToolCall(tool="delete_ticket"), GRANTS)
    with pytest.raises(ValueError, match="allowlists name unknown tools"):
        default_registry({"delete_ticket": "*"})
    with pytest.raises(ValueError, match="timeout_s must be > 0, got 0"):
        ToolSpec("slow", "1", ListOpenTicketsArgs, "", timeout_s=0)
    with pytest.raises(ValueError, match="cannot be cached"):
        ToolSpec("writer", "1", ListOpenTicketsArgs, "", cache_ttl_s=5, side_effects=True)
    with pytest.raises(ValueError, match="registered twice"):
        ToolRegistry([SHIPPED_TOOLS["get_ticket"], SHIPPED_TOOLS["get_ticket"]])


def test_a_result_renders_as_citable_evidence_and_hashes_its_content(
        registry: ToolRegistry) -> None:
    call = registry.validate("acme", ToolCall(tool="get_ticket", args={"ticket_id": "INC-2057"}),
                             GRANTS)
    output = ToolOutput(title="Ticket INC-2057", content="Ticket INC-2057 is open.",
                        data={"status": "open"})

    result = ok_result(call, output, 0.01)
    same = ok_result(call, output, 0.5)
    failed = error_result(call, "ToolTimeout", "too slow", 3.0)
    chunk = RetrievedChunk.model_validate(result.as_evidence())

    assert chunk.chunk_id == f"tool:{call.call_id}"
    assert chunk.document_id == "tool:get_ticket"
    assert chunk.text == "Ticket INC-2057 is open."
    assert result.result_hash == same.result_hash  # duration is not part of the result
    assert len(result.result_hash) == 64
    assert failed.outcome == "error" and failed.result_hash != result.result_hash
    assert result.audit_payload() | {"duration_s": 0} == {
        "call_id": call.call_id, "tool": "get_ticket", "version": "2",
        "args": {"ticket_id": "INC-2057"}, "idempotency_key": None,
        "result_hash": result.result_hash, "duration_s": 0, "outcome": "ok", "error_class": None,
        "served_from": "executed"}


@pytest.mark.parametrize(("text", "tool", "args"), [
    ("What's the status of ticket INC-2057?", "get_ticket", {"ticket_id": "INC-2057"}),
    ("is inc 3140 still open", "get_ticket", {"ticket_id": "INC-3140"}),
    ("Any update on ticket #2089?", "get_ticket", {"ticket_id": "INC-2089"}),
    ("List acme's open tickets.", "list_open_tickets", {"limit": 20}),
    ("Which tickets are open right now?", "list_open_tickets", {"limit": 20}),
    ("Show me the top 5 open incidents", "list_open_tickets", {"limit": 5}),
    ("Show me 900 open tickets", "list_open_tickets", {"limit": 50}),
    ("What's in the globex incident queue right now?", "list_open_tickets", {"limit": 20}),
    ("What time is it in UTC?", "current_time", {}),
    ("What is today's date?", "current_time", {}),
    ("Tell me the current date and time.", "current_time", {}),
])
def test_the_planner_maps_request_text_to_one_read_only_call(text: str, tool: str,
                                                              args: dict[str, object]) -> None:
    planned = plan_tool_call(text)

    assert planned == ToolCall(tool=tool, args=args)
    default_registry().validate("acme", planned, GRANTS)  # every plan validates


@pytest.mark.parametrize("text", [
    "Compare INC-2057 with INC-2063.",  # two tickets: ambiguous
    "What time did the alert fire?",  # a question about the past, not the clock
    "How do I roll back a deploy?",
])
def test_the_planner_plans_nothing_it_cannot_map_safely(text: str) -> None:
    assert plan_tool_call(text) is None


def test_the_planner_never_plans_a_side_effect_from_request_text() -> None:
    planned = plan_tool_call("Add a note to INC-2057 saying the fix shipped.")

    assert planned == ToolCall(tool="get_ticket", args={"ticket_id": "INC-2057"})
