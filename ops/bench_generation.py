"""Generation benchmark: the batching engine against a naive loop, same prompts, same model.

    .venv/bin/python ops/bench_generation.py [--model PATH | --random-config {tiny,0.5b}]
        [--requests N] [--naive-requests M] [--max-new-tokens T] [--batch-size B]
        [--kv-gib G] [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16|float16]
        [--threads K] [--skip-static] [--json PATH]

In one run, on one model and one set of prompts, it measures completion tokens per second of:

* naive: one `model.generate` call per request (batch 1, greedy, the request's own cap);
* static: plain `model.generate` on left-padded batches of `--batch-size` consecutive
  requests (the batches the engine forms); only the tokens each request asked for count,
  though every row decodes until the batch's last row is done;
* engine: every request submitted at once to `GenerationEngine`, which batches them under
  `--batch-size` and a KV-cache budget and drops rows from a batch as they finish.

`--model` (default: SmolLM2-135M-Instruct) uses real chat prompts, greedy, EOS honoured; the
outputs of the naive loop and the engine are compared and their agreement rate printed.
`--random-config` builds a Llama-shaped model with random weights (`0.5b`: about
Qwen2.5-0.5B's dimensions with a 32k vocabulary; `tiny`: for CI smoke tests), random prompt
ids of mixed lengths and mixed output caps, with end-of-sequence ignored so that every
request decodes exactly its cap.

The naive loop may run on an evenly spaced subset (`--naive-requests`, default 16 on cpu, 64
on cuda, where all 256 at about 20 ms a token would outrun a 10-minute run): tokens/s is a
rate, and the subset keeps the mix of lengths. Ratios compare rates measured in this run, never across runs.

Imports only torch, transformers and `tasks.engine` (no Redis, Postgres or workers), so it runs
on a bare accelerator machine. Exit status: 0 when every measurement ran (goals met or not),
1 when any request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path("~/.cache/sluice/models/SmolLM2-135M-Instruct").expanduser()
GOAL_CPU, GOAL_GPU = 6.0, 10.0
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    # about Qwen2.5-0.5B's shape (hidden 896, 24 layers, GQA 14/2), with a 32k vocabulary
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, head_dim=64, intermediate_size=4864, vocab_size=32000,
                 max_position_embeddings=4096, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=512,
                 max_position_embeddings=1024, tie_word_embeddings=True),
}
QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in simple terms.",
    "How does a refrigerator keep food cold?",
    "Why is the sky blue?",
    "What are three tips for writing clear emails?",
    "How do vaccines train the immune system?",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn leaves.",
    "How does compound interest work?",
    "What causes the seasons on Earth?",
    "Give me a short recipe for pancakes.",
    "What is a prime number? Give two examples.",
    "How do airplanes stay in the air?",
    "What is machine learning?",
    "Summarize the plot of Romeo and Juliet.",
    "How can I improve my sleep?",
    "What does a database index do?",
    "Why do we have leap years?",
    "What is the boiling point of water at sea level?",
    "How do bees make honey?",
    "What are the main causes of inflation?",
    "Explain what an API is to a beginner.",
    "What is the Pythagorean theorem?",
    "How do solar panels generate electricity?",
    "Name three benefits of regular exercise.",
    "What is the difference between a virus and a bacterium?",
    "How does a compass work?",
    "What is the tallest mountain in the world?",
    "Explain recursion with a simple example.",
    "Why does ice float on water?",
    "What should I pack for a weekend hiking trip?",
    "How do noise-cancelling headphones work?",
    "What is the role of the heart in the body?",
    "How are rainbows formed?",
    "What is a good way to learn a new language?",
    "Explain supply and demand.",
    "What is the speed of light?",
    "How do I make a cup of green tea?",
    "What is the difference between RAM and storage?",
    "Why do cats purr?",
]
VARIANTS = ["", " Answer in one sentence.", " Explain briefly.", " Keep it short and simple."]


class BenchError(RuntimeError):
    """A measurement that could not be made."""


@dataclass
class Prompt:
    """One request of the workload: the token ids every mode feeds the model."""

    request_id: str
    ids: list[int]
    max_new_tokens: int
    messages: list[dict[str, str]] | None = None  # chat prompts: what the engine is given


@dataclass
class Workload:
    """One model and its prompts; `ignore_eos` for random weights (every request runs full)."""

    name: str
    model: Any
    tokenizer: Any
    backend: Any
    prompts: list[Prompt]
    ignore_eos: bool
    params: int


@dataclass
class ModeResult:
    """What one mode made and how long it took."""

    mode: str
    requests: int
    tokens: int
    wall_s: float
    notes: str = ""
    batches: int | None = None
    mean_batch_size: float | None = None
    outputs: dict[str, Any] = field(default_factory=dict, repr=False)  # request id -> output

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


# -- arguments ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None,
                        help=f"a local causal-LM folder (default {DEFAULT_MODEL})")
    source.add_argument("--random-config", choices=sorted(RANDOM_CONFIGS),
                        help="a Llama-shaped model with random weights, EOS ignored")
    parser.add_argument("--requests", type=int, default=None,
                        help="default 64 with --model, 256 with --random-config")
    parser.add_argument("--naive-requests", type=int, default=None,
                        help="evenly spaced subset for the naive loop (default 16 cpu, 64 cuda)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="the cap (--model, default 64); the largest cap (--random-config, "
                             "default 256: caps drawn from [T/4, T])")
    parser.add_argument("--prompt-tokens", default="16-512",
                        help="random prompt lengths LO-HI (--random-config)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--kv-gib", type=float, default=4.0, help="the engine's KV-cache budget")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto",
                        choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: every core on cpu, torch's own on cuda)")
    parser.add_argument("--skip-static", action="store_true", help="no static-batch baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    random_mode = args.random_config is not None
    args.requests = args.requests or (256 if random_mode else 64)
    args.max_new_tokens = args.max_new_tokens or (256 if random_mode else 64)
    for name in ("requests", "max_new_tokens", "batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.naive_requests is not None and args.naive_requests <= 0:
        parser.error(f"--naive-requests must be > 0, got {args.naive_requests}")
    return args


def prompt_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    lo, hi = int(low), int(high or low)
    if not 0 < lo <= hi:
        raise BenchError(f"--prompt-tokens must be LO-HI with 0 < LO <= HI, got {text!r}")
    return lo, hi


# -- the model and its prompts -------------------------------------------------------------


def resolve_device(torch: Any, args: argparse.Namespace) -> tuple[str, Any]:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = args.dtype if args.dtype != "auto" else (
        "bfloat16" if device == "cuda" else "float32")
    threads = args.threads or (os.cpu_count() if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    return device, getattr(torch, dtype_name)


def random_workload(args: argparse.Namespace, device: str, dtype: Any) -> Workload:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.engine.hf import TransformersBackend

    torch.manual_seed(args.seed)
    config = LlamaConfig(**RANDOM_CONFIGS[args.random_config])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    name = f"random-{args.random_config}"
    backend = TransformersBackend.from_loaded(model, None, name=name)
    lo, hi = prompt_range(args.prompt_tokens)
    rng = random.Random(args.seed)
    least = max(1, args.max_new_tokens // 4)
    prompts = [Prompt(f"r{i:04d}", [rng.randrange(3, config.vocab_size)
                                    for _ in range(rng.randint(lo, hi))],
                      rng.randint(least, args.max_new_tokens))
               for i in range(args.requests)]
    return Workload(name, model, None, backend, prompts, True, _params(model))


def model_workload(args: argparse.Namespace, device: str, dtype: Any) -> Workload:
    from tasks.engine.hf import TransformersBackend

    path = (args.model or DEFAULT_MODEL).expanduser()
    dtype_name = str(dtype).removeprefix("torch.")
    backend = TransformersBackend(str(path), device=device, dtype=dtype_name,
                                  torch_threads=args.threads)
    backend.warm_up()
    tokenizer = backend.tokenizer
    prompts = []
    for i in range(args.requests):
        question = QUESTIONS[i % len(QUESTIONS)] + VARIANTS[(i // len(QUESTIONS)) % len(VARIANTS)]
        messages = [{"role": "user", "content": question}]
        prompts.append(Prompt(f"q{i:04d}", _encode(tokenizer, messages), args.max_new_tokens,
                              messages))
    return Workload(path.name, backend.model, tokenizer, backend, prompts, False,
                    _params(backend.model))


def _encode(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The same ids the engine's backend makes from these messages."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the three modes -----------------------------------------------------------------------


def _sync(model: Any) -> None:
    import torch

    if model.device.type == "cuda":
        torch.cuda.synchronize()


def _eos_ids(model: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    return {int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None}


def _hf_generate(work: Workload, batch: list[Prompt]) -> list[list[int]]:
    """Plain `generate` on left-padded prompts: each row's new tokens, cut at its own cap and
    just after its first EOS (what that request would have made on its own)."""
    import torch

    model = work.model
    width = max(len(p.ids) for p in batch)
    pad = int(model.generation_config.pad_token_id or 0)
    ids = torch.tensor([[pad] * (width - len(p.ids)) + p.ids for p in batch], device=model.device)
    mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in batch],
                        device=model.device)
    cap = max(p.max_new_tokens for p in batch)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cap,
                             min_new_tokens=cap if work.ignore_eos else None,
                             do_sample=False, pad_token_id=pad)
    eos = set() if work.ignore_eos else _eos_ids(model)
    rows = []
    for prompt, row in zip(batch, out[:, width:].tolist(), strict=True):
        row = row[:prompt.max_new_tokens]
        end = next((k for k, token in enumerate(row) if token in eos), None)
        rows.append(row if end is None else row[:end + 1])
    return rows


def run_naive(work: Workload, subset: list[Prompt]) -> ModeResult:
    _hf_generate(work, [Prompt("warm", subset[0].ids[:8], 2)])
    outputs = {}
    _sync(work.model)
    started = time.perf_counter()
    for prompt in subset:
        outputs[prompt.request_id] = _hf_generate(work, [prompt])[0]
    _sync(work.model)
    wall_s = time.perf_counter() - started
    tokens = sum(len(o) for o in outputs.values())
    note = "one generate() per request, batch 1"
    if len(subset) < len(work.prompts):
        note += f"; evenly spaced subset of {len(subset)}/{len(work.prompts)} (a rate)"
    return ModeResult("naive", len(subset), tokens, wall_s, note, len(subset), 1.0, outputs)


def run_static(work: Workload, batch_size: int) -> ModeResult:
    batches = [work.prompts[i:i + batch_size] for i in range(0, len(work.prompts), batch_size)]
    _hf_generate(work, [Prompt("warm", p.ids[:8], 2) for p in batches[0]])
    _sync(work.model)
    started = time.perf_counter()
    tokens = sum(len(row) for batch in batches for row in _hf_generate(work, batch))
    _sync(work.model)
    wall_s = time.perf_counter() - started
    return ModeResult("static", len(work.prompts), tokens, wall_s,
                      "generate() on left-padded batches; only requested tokens count",
                      len(batches), len(work.prompts) / len(batches))


def _requests(work: Workload, prompts: list[Prompt]) -> list[Any]:
    from tasks.engine.types import DecodingPolicy, GenerationRequest

    def request(p: Prompt) -> GenerationRequest:
        policy = DecodingPolicy(name="bench", max_new_tokens=p.max_new_tokens,
                                ignore_eos=work.ignore_eos)
        if p.messages is not None:
            return GenerationRequest(p.request_id, p.messages, policy)
        return GenerationRequest(p.request_id, [], policy, prompt_ids=p.ids)

    return [request(p) for p in prompts]


def run_engine(work: Workload, batch_size: int, kv_gib: float) -> ModeResult:
    from tasks.engine.engine import BatchLimits, GenerationEngine

    limits = BatchLimits(kv_budget_bytes=int(kv_gib * 2**30), max_batch_size=batch_size)
    engine = GenerationEngine(work.backend, limits)
    try:
        engine.generate(_requests(work, [Prompt("warm", p.ids[:8], 2)
                                         for p in work.prompts[:batch_size]]))
        batches_before = engine.batches_run
        requests = _requests(work, work.prompts)
        _sync(work.model)
        started = time.perf_counter()
        completions = engine.generate(requests)
        _sync(work.model)
        wall_s = time.perf_counter() - started
        batches = engine.batches_run - batches_before
    finally:
        engine.close()
    failed = [c for c in completions if c.finish_reason in ("error", "refused")]
    if failed:
        raise BenchError(f"{len(failed)} engine requests failed, first: {failed[0].error}")
    tokens = sum(c.completion_tokens for c in completions)
    return ModeResult("engine", len(completions), tokens, wall_s,
                      f"all submitted at once; KV budget {kv_gib:g} GiB", batches,
                      len(completions) / max(1, batches),
                      {c.request_id: c for c in completions})


# -- figures -------------------------------------------------------------------------------


def naive_subset(prompts: list[Prompt], count: int) -> list[Prompt]:
    """`count` prompts spread evenly over the workload, so the subset keeps its length mix."""
    count = min(count, len(prompts))
    return [prompts[i * len(prompts) // count] for i in range(count)]


def agreement(work: Workload, naive: ModeResult, engine: ModeResult) -> dict[str, Any] | None:
    """How many naive-loop outputs the engine reproduced (same text under greedy decoding)."""
    if work.tokenizer is None:
        return None
    same = sum(work.tokenizer.decode(ids, skip_special_tokens=True).strip()
               == engine.outputs[rid].text for rid, ids in naive.outputs.items())
    compared = len(naive.outputs)
    return {"compared": compared, "agreed": same, "rate": same / compared}


def _ratio(a: ModeResult | None, b: ModeResult | None) -> float | None:
    if a is None or b is None or b.tokens_per_s == 0:
        return None
    return a.tokens_per_s / b.tokens_per_s


def figures(args: argparse.Namespace, work: Workload, device: str, modes: list[ModeResult],
            agree: dict[str, Any] | None) -> dict[str, Any]:
    import torch
    import transformers

    by = {m.mode: m for m in modes}
    engine = by["engine"]
    goal = GOAL_GPU if device == "cuda" else GOAL_CPU
    ratio = _ratio(engine, by["naive"])
    lengths = [len(p.ids) for p in work.prompts]
    return {
        "model": work.name, "random_config": args.random_config, "params": work.params,
        "device": device, "dtype": str(work.model.dtype).removeprefix("torch."),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "requests": len(work.prompts), "naive_requests": by["naive"].requests,
        "batch_size": args.batch_size, "kv_gib": args.kv_gib, "ignore_eos": work.ignore_eos,
        "prompt_tokens": {"min": min(lengths), "max": max(lengths),
                          "mean": sum(lengths) / len(lengths)},
        "modes": {m.mode: {**{k: v for k, v in asdict(m).items() if k != "outputs"},
                           "tokens_per_s": m.tokens_per_s} for m in modes},
        "tokens_per_s": {m.mode: m.tokens_per_s for m in modes},
        "ratio_engine_naive": ratio,
        "ratio_engine_static": _ratio(engine, by.get("static")),
        "goal_engine_naive": goal, "goal_met": ratio is not None and ratio >= goal,
        "agreement": agree,
        "per_request": [{"request_id": p.request_id, "prompt_tokens": len(p.ids),
                         "max_new_tokens": p.max_new_tokens,
                         "engine_tokens": engine.outputs[p.request_id].completion_tokens,
                         "finish_reason": engine.outputs[p.request_id].finish_reason}
                        for p in work.prompts],
    }


def print_report(fig: dict[str, Any], modes: list[ModeResult]) -> None:
    source = f"random weights ({fig['random_config']})" if fig["random_config"] else "trained weights"
    p = fig["prompt_tokens"]
    print(f"Sluice generation benchmark: {fig['model']} ({fig['params'] / 1e6:,.1f}M params, "
          f"{source}) on {fig['device']} {fig['dtype']}, torch {fig['torch']}, "
          f"transformers {fig['transformers']}, python {fig['python']}, "
          f"{fig['threads']} threads")
    print(f"{fig['requests']} requests, prompts {p['min']}-{p['max']} tokens "
          f"(mean {p['mean']:.0f}), batch size {fig['batch_size']}, greedy, "
          f"{'EOS ignored' if fig['ignore_eos'] else 'EOS honoured'}")
    print(f"{'mode':<7} {'requests':>8} {'tokens':>7} {'wall s':>8} {'tokens/s':>9} "
          f"{'batches':>7} {'mean bs':>7}  notes")
    for m in modes:
        print(f"{m.mode:<7} {m.requests:>8} {m.tokens:>7} {m.wall_s:>8.2f} "
              f"{m.tokens_per_s:>9.1f} {m.batches or 0:>7} {m.mean_batch_size or 0:>7.1f}  "
              f"{m.notes}")
    ratio = fig["ratio_engine_naive"]
    verdict = "met" if fig["goal_met"] else "NOT met"
    print(f"engine / naive  = {ratio:.1f}x (goal >= {GOAL_CPU:g}x on CPU, >= {GOAL_GPU:g}x on "
          f"GPU: {verdict} on {fig['device']})")
    if fig["ratio_engine_static"] is not None:
        print(f"engine / static = {fig['ratio_engine_static']:.2f}x")
    if fig["agreement"] is not None:
        a = fig["agreement"]
        print(f"outputs: engine agrees with the naive loop on {a['agreed']}/{a['compared']} "
              f"requests ({a['rate']:.0%})")


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    device, dtype = resolve_device(torch, args)
    work = random_workload(args, device, dtype) if args.random_config \
        else model_workload(args, device, dtype)
    naive_count = args.naive_requests or (64 if device == "cuda" else 16)
    try:
        modes = [run_naive(work, naive_subset(work.prompts, naive_count))]
        if not args.skip_static:
            modes.append(run_static(work, args.batch_size))
        modes.append(run_engine(work, args.batch_size, args.kv_gib))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    fig = figures(args, work, device, modes, agreement(work, modes[0], modes[-1]))
    print_report(fig, modes)
    if args.json is not None:
        args.json.write_text(json.dumps(fig, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    # Run as a script, Python puts ops/ first on sys.path, where its modules would shadow
    # top-level names; Sluice's imports expect the repository root.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))
    sys.exit(main())
