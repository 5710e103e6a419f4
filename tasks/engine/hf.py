"""The `transformers` backend: any local causal-LM folder (or GGUF file), batched in one
decoding loop of our own, so that every row has its own sampler, stop strings, deadline and
output constraint, and finished rows leave the batch instead of decoding padding."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.engine.chat import ChatTemplate
from tasks.engine.constraint import ConstraintViolation
from tasks.engine.types import AcceleratorOutOfMemory, Completion, GenerationRequest, RequestRejected

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class _Row:
    """One sequence of a running batch."""

    request: GenerationRequest
    prompt_ids: list[int]
    sampler: Any  # torch.Generator, or None under greedy decoding
    constraint: Any = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None
    ended_by_eos: bool = False
    error: str | None = None  # why a row ended with `error`


class TransformersBackend:
    """A local Hugging Face model on cpu or cuda."""

    kind = "transformers"

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto",
                 torch_threads: int | None = None) -> None:
        path = Path(model_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"generator model not found: {path}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.path = path
        self.device_name = device
        self.dtype_name = dtype
        self.torch_threads = torch_threads
        self.model_id = path.name
        self.context_window = 0
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos: set[int] = set()
        self._constraints: Any = None
        self._cache_arg = "past_key_values"
        self._chat: ChatTemplate | None = None

    # -- loading ---------------------------------------------------------------------------

    def warm_up(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        device = self.device_name
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        folder, gguf = (self.path.parent, self.path.name) if self.path.is_file() else (self.path, None)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf,
                                                     dtype=self._dtype(torch, device)).to(device)
        model.eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._adopt(model, tokenizer, self.path.name)

    def _adopt(self, model: Any, tokenizer: Any, name: str) -> None:
        """Hold a loaded model: its stop tokens, cache argument, window and identity."""
        self._chat = ChatTemplate(tokenizer, name) if tokenizer is not None else None
        self._tokenizer, self._model = tokenizer, model
        self._eos = _eos_ids(model, tokenizer)
        # transformers renamed `past_key_values` to `cache`; older releases know only the first
        self._cache_arg = ("cache" if "cache" in inspect.signature(model.forward).parameters
                           else "past_key_values")
        self.context_window = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self.model_id = f"{name}:{model.device}:{str(model.dtype).removeprefix('torch.')}"

    def _dtype(self, torch: Any, device: str) -> Any:
        if self.dtype_name != "auto":
            return getattr(torch, self.dtype_name)
        return torch.bfloat16 if device == "cuda" else torch.float32

    @property
    def tokenizer(self) -> Any:
        self.warm_up()
        return self._tokenizer

    @property
    def model(self) -> Any:
        self.warm_up()
        return self._model

    # -- the Backend protocol ----------------------------------------------------------------

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any = None, name: str = "in-memory"
                    ) -> TransformersBackend:
        """A backend over a model already in memory (benchmarks on random weights). Without
        a tokenizer, requests must carry `prompt_ids` and texts come back empty."""
        backend = cls.__new__(cls)
        backend.path, backend.device_name, backend.dtype_name = Path(name), "given", "given"
        backend.torch_threads, backend._constraints = None, None
        backend._adopt(model.eval(), tokenizer, name)
        return backend

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self._encode(messages))

    def kv_bytes_per_token(self) -> int | None:
        """2 (K and V) x layers x kv heads x head dim x bytes per element."""
        config = self.model.config
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * self.model.dtype.itemsize

    def generate(self, batch: list[GenerationRequest]) -> list[Completion]:
        import torch

        started = time.monotonic()
        rows = [self._row_or_error(request) for request in batch]
        live = [row for row in rows if row.finish_reason is None]
        try:
            if live:
                with torch.inference_mode():
                    self._decode(live)
        except torch.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise AcceleratorOutOfMemory(f"batch of {len(batch)} did not fit: {exc}") from exc
        compute_s = (time.monotonic() - started) / max(1, len(live))
        decoded = {id(row) for row in live}
        return [self._completion(row, started, compute_s if id(row) in decoded else 0.0,
                                 len(live)) for row in rows]

    # -- decoding ----------------------------------------------------------------------------

    def _encode(self, messages: list[dict[str, str]]) -> list[int]:
        self.warm_up()
        if self._chat is None:
            raise RequestRejected("a model loaded without a tokenizer takes prompt_ids only")
        return self._chat.prompt_ids(messages)

    def _row_or_error(self, request: GenerationRequest) -> _Row:
        """The request's row, or a row ended with `error` when the request itself is at fault
        (a schema the grammar compiler refuses, messages its chat template rejects): the
        batch, which may hold other callers' requests, goes on without it."""
        try:
            return self._row(request)
        except RequestRejected as exc:
            return _Row(request, [], None, finish_reason="error",
                        error=f"{type(exc).__name__}: {exc}"[:1000])

    def _row(self, request: GenerationRequest) -> _Row:
        import torch

        sampler = None
        if not request.policy.greedy:
            sampler = torch.Generator(device=self.model.device).manual_seed(request.seed)
        constraint = None
        if request.json_schema is not None:
            constraint = self._constraint_factory().for_schema(request.json_schema)
        ids = request.prompt_ids if request.prompt_ids is not None else self._encode(
            request.messages)
        return _Row(request, list(ids), sampler, constraint)

    def _constraint_factory(self) -> Any:
        if self._constraints is None:
            from tasks.engine.constraint import JsonSchemaConstraints

            self._constraints = JsonSchemaConstraints(self.tokenizer, self.model.config.vocab_size,
                                                      stop_token_ids=self._eos)
        return self._constraints

    def _decode(self, rows: list[_Row]) -> None:
        """Prefill the left-padded prompts, then one token per live row per step; rows that
        finish leave the batch (their KV cache rows are dropped)."""
        import torch
        from transformers import DynamicCache

        device = self.model.device
        width = max(len(r.prompt_ids) for r in rows)
        pad = int(self._tokenizer.pad_token_id) if self._tokenizer is not None else 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows],
                           device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids)
                             for r in rows], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers before 4.56 builds its cache without the config
            cache = DynamicCache()
        live = list(range(len(rows)))
        logits = self._forward(ids, mask, positions, cache)
        while True:
            chosen = self._choose(logits, [rows[i] for i in live])
            tokens = chosen.tolist()  # one copy from the device a step, not one a row
            keep = [k for k, i in enumerate(live) if self._advance(rows[i], tokens[k]) is None]
            if not keep:
                return
            if len(keep) < len(live):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                chosen, mask, positions = chosen[index], mask[index], positions[index]
                live = [live[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            positions = positions[:, -1:] + 1
            logits = self._forward(chosen.unsqueeze(1), mask, positions, cache)

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1, :].float()

    def _choose(self, logits: Any, rows: list[_Row]) -> Any:
        """The next token of every live row: greedy rows by argmax, sampling rows from their
        own generator; a constrained row only among the tokens its schema allows."""
        import torch

        for k, row in enumerate(rows):
            if row.constraint is not None:
                row.constraint.mask_logits(logits[k])
        chosen = logits.argmax(dim=-1)
        for k, row in enumerate(rows):
            if row.sampler is not None:
                chosen[k] = _sample(logits[k], row.request.policy.temperature,
                                    row.request.policy.top_p, row.sampler)
        return chosen.to(torch.long)

    def _advance(self, row: _Row, token_id: int) -> str | None:
        """Append one token; returns the finish reason when the row is done."""
        policy = row.request.policy
        if row.constraint is not None and (token_id not in self._eos or policy.ignore_eos):
            try:
                row.constraint.accept(token_id)
            except ConstraintViolation as exc:  # the grammar and the mask disagree: this row only
                row.finish_reason, row.error = "error", f"{type(exc).__name__}: {exc}"[:1000]
                return row.finish_reason
        if token_id in self._eos and not policy.ignore_eos:
            row.finish_reason, row.ended_by_eos = "stop", True
        else:
            row.tokens.append(token_id)
            complete = row.constraint is not None and row.constraint.is_complete()
            if complete or (policy.stop and self._hit_stop(row)):
                row.finish_reason = "stop"
            elif len(row.tokens) >= policy.max_new_tokens:
                row.finish_reason = "length"
            elif row.request.deadline is not None and time.monotonic() > row.request.deadline:
                row.finish_reason = "deadline"
        return row.finish_reason

    def _hit_stop(self, row: _Row) -> bool:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        for stop in row.request.policy.stop:
            at = text.find(stop)
            if at >= 0:
                row.text = text[:at]
                return True
        return False

    def _completion(self, row: _Row, started: float, compute_s: float, size: int) -> Completion:
        text = row.text if row.text is not None else "" if self._tokenizer is None else \
            self._tokenizer.decode(row.tokens, skip_special_tokens=True)
        reason = row.finish_reason or "length"
        return Completion(request_id=row.request.request_id, text=text.strip(),
                          prompt_tokens=len(row.prompt_ids),
                          completion_tokens=len(row.tokens) + int(row.ended_by_eos),
                          finish_reason=reason, backend=self.kind, model=self.model_id,
                          queue_wait_s=max(0.0, started - row.request.submitted_at),
                          batch_size=size, compute_s=compute_s,
                          constrained=row.constraint is not None,
                          error=row.error or ("deadline passed while decoding"
                                              if reason == "deadline" else None))


def _sample(logits: Any, temperature: float, top_p: float, sampler: Any) -> Any:
    """One token from softmax(logits / t), restricted to the top-p nucleus."""
    import torch

    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered > top_p
        ordered[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, ordered)
    return torch.multinomial(probs, 1, generator=sampler)[0]


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos])
    if tokenizer is not None:
        ids.add(tokenizer.eos_token_id)
    return {int(i) for i in ids if i is not None}
