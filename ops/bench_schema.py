"""Schema-valid rate of generated documents, with and without the JSON-schema constraint.

    .venv/bin/python ops/bench_schema.py [--model PATH] [--max-new-tokens 384] [--json PATH]

Same model, same document requests, one run: each example-corpus document below is the only
source of a document request of its template; the requests are generated once decoded under
their template's JSON schema and once free (the prompt shows the schema both times). A draft
is schema-valid when it parses into its template's pydantic model (the contract validator's
first check). Citations and support are not scored here: that is the validators' job.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from schemas.documents import document_schema
from schemas.stages import GenerationInput, GenerationItem, RetrievedChunk
from schemas.status import AnswerClass
from tasks.engine.engine import BatchLimits, GenerationEngine
from tasks.engine.hf import TransformersBackend
from tasks.generation import DecodingPolicies, generate
from tasks.prompting import PromptTemplates
from tasks.templates import load_templates
from tasks.validators.contract import ContractRegistry

CORPUS = Path(__file__).resolve().parent / "examples" / "corpus" / "acme"
DEFAULT_MODEL = Path("~/.cache/sluice/models/SmolLM2-135M-Instruct").expanduser()
CASES = [  # (template, inputs, topic, source document)
    ("incident_summary", {"incident_id": "INC-2057", "audience": "executives"},
     "duplicate invoices", "engineering/inc-2057-billing-duplicate-invoices.md"),
    ("incident_summary", {"incident_id": "INC-2063", "audience": "engineers"},
     "certificate expiry", "engineering/inc-2063-dispatch-gateway-cert-expiry.md"),
    ("incident_summary", {"incident_id": "INC-2041", "audience": "support staff"},
     "route planner latency", "engineering/inc-2041-route-planner-latency.md"),
    ("runbook_brief", {"service": "billing-api"}, "on-call brief",
     "engineering/billing-api-runbook.md"),
    ("runbook_brief", {"service": "dispatch-gateway"}, "first responder brief",
     "engineering/dispatch-gateway-runbook.md"),
    ("runbook_brief", {"service": "route-planner"}, "health checks",
     "engineering/route-planner-runbook.md"),
    ("policy_brief", {"policy_area": "expenses"}, "rules for new managers",
     "public/expense-policy.md"),
    ("policy_brief", {"policy_area": "parental leave"}, "what new parents need to know",
     "hr/parental-leave-policy.md"),
    ("policy_brief", {"policy_area": "remote work"}, "working from home",
     "hr/remote-work-policy.md"),
    ("policy_brief", {"policy_area": "data retention"}, "how long we keep data",
     "public/data-retention-policy.md"),
]


def items() -> list[GenerationItem]:
    templates = load_templates()
    out = []
    for i, (template, inputs, topic, path) in enumerate(CASES):
        text = (CORPUS / path).read_text(encoding="utf-8")[:1200]
        chunk = RetrievedChunk(chunk_id=f"chunk{i:02d}", document_id=path, title=path,
                               text=text, score=1.0)
        out.append(GenerationItem(
            request_id=f"doc-{i:02d}-{template}", answer_class=AnswerClass.DOCUMENT,
            instruction=templates[template].instruction_for(topic, inputs), chunks=[chunk],
            decoding_policy="document-greedy-long", json_schema=document_schema(template)))
    return out


def score(texts: dict[str, str]) -> dict[str, Any]:
    contracts = ContractRegistry.default()
    parsed = valid = 0
    for request_id, text in texts.items():
        template = request_id.split("-", 2)[2]
        try:
            json.loads(text)
            parsed += 1
        except ValueError:
            pass
        valid += not contracts.contracts[template].check(text)[1]
    n = len(texts)
    return {"requests": n, "json_parses": parsed / n, "schema_valid": valid / n}


def run(engine: GenerationEngine, constrain: bool, max_new_tokens: int) -> dict[str, Any]:
    batch = GenerationInput(items=items())
    started = time.monotonic()
    drafts = generate(batch, engine, PromptTemplates.load(), DecodingPolicies.load(max_new_tokens),
                      constrain=constrain).drafts
    wall = time.monotonic() - started
    tokens = sum(d.completion_tokens for d in drafts)
    return {**score({d.request_id: d.text for d in drafts}), "wall_s": round(wall, 2),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "finish_reasons": sorted({d.finish_reason for d in drafts}),
            "examples": {d.request_id: d.text[:300] for d in drafts[:2]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    engine = GenerationEngine(TransformersBackend(str(args.model), torch_threads=args.threads),
                              BatchLimits(max_batch_size=32, gather_s=0.0))
    engine.warm_up()
    try:
        figures = {"model": engine.model_id,
                   "constrained": run(engine, True, args.max_new_tokens),
                   "free": run(engine, False, args.max_new_tokens)}
    finally:
        engine.close()
    print(f"Schema-valid documents, {engine.model_id}, {len(CASES)} requests, "
          f"max {args.max_new_tokens} new tokens, greedy")
    print(f"{'mode':<12}{'json parses':>12}{'schema valid':>14}{'tokens/s':>10}{'wall s':>8}")
    for mode in ("constrained", "free"):
        f = figures[mode]
        print(f"{mode:<12}{f['json_parses']:>12.0%}{f['schema_valid']:>14.0%}"
              f"{f['tokens_per_s']:>10}{f['wall_s']:>8}")
    for mode in ("constrained", "free"):
        for request_id, text in figures[mode]["examples"].items():
            print(f"[{mode}] {request_id}: {text!r}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
