"""The generation stage: a chat-templated causal LM over labelled sources, greedy by default."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from schemas.stages import Draft, GenerationInput, GenerationItem, GenerationOutput
from schemas.status import AnswerClass
from tasks.files import PROMPTS_DIR

ABSTAIN_TEXT = "I don't know."


@dataclass(frozen=True)
class DecodingPolicy:
    """Part of the product's behaviour, so part of the version tuple."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0

    @property
    def version(self) -> str:
        mode = f"sample-t{self.temperature}" if self.do_sample else "greedy"
        return f"{mode}-max{self.max_new_tokens}"


@dataclass(frozen=True)
class PromptSet:
    system: str
    answer: str
    document: str
    repair: str

    @classmethod
    def load(cls, folder: Path = PROMPTS_DIR) -> PromptSet:
        return cls(*(((folder / f"{n}.txt").read_text(encoding="utf-8")).strip()
                     for n in ("system", "answer", "document", "repair")))

    def messages(self, item: GenerationItem) -> tuple[list[dict[str, str]], dict[str, str]]:
        """System instructions and user data in separate messages; sources labelled S1..Sn.
        A repair attempt adds the rejected draft as the assistant's turn and the validators'
        reasons as a turn of their own."""
        labels = {f"S{i}": c.chunk_id for i, c in enumerate(item.chunks, start=1)}
        sources = "\n\n".join(f"[S{i}] ({c.title})\n{c.text}"
                              for i, c in enumerate(item.chunks, start=1)) or "(no sources)"
        template = self.document if item.answer_class == AnswerClass.DOCUMENT else self.answer
        user = template.format(sources=sources, instruction=item.instruction)
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": user}]
        if item.feedback:
            reasons = "\n".join(f"- {reason}" for reason in item.feedback)
            messages += [{"role": "assistant", "content": item.previous_draft or ""},
                         {"role": "user", "content": self.repair.format(feedback=reasons)}]
        return messages, labels


class Generator(Protocol):
    name: str

    def warm_up(self) -> None: ...

    def generate(self, batch: GenerationInput) -> GenerationOutput: ...


class HFGenerator:
    """Any local Hugging Face causal-LM folder, batched with left padding."""

    def __init__(self, model_path: str, policy: DecodingPolicy, prompts: PromptSet,
                 torch_threads: int = 1, max_batch: int = 8) -> None:
        self.model_path = model_path
        self.name = Path(model_path).name
        self.policy = policy
        self.prompts = prompts
        self.torch_threads = torch_threads
        self.max_batch = max_batch
        self._model: Any = None
        self._tokenizer: Any = None

    def warm_up(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(self.torch_threads)
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(device)
        model.eval()
        self._tokenizer, self._model = tokenizer, model

    def generate(self, batch: GenerationInput) -> GenerationOutput:
        self.warm_up()
        started = time.monotonic()
        drafts: list[Draft] = []
        for start in range(0, len(batch.items), self.max_batch):
            budget = None if batch.deadline_s is None else batch.deadline_s - (time.monotonic() - started)
            drafts.extend(self._generate_group(batch.items[start:start + self.max_batch], budget))
        return GenerationOutput(drafts=drafts)

    def _generate_group(self, items: list[GenerationItem], budget_s: float | None) -> list[Draft]:
        import torch

        prompts, labels = zip(*(self.prompts.messages(item) for item in items), strict=True)
        texts = [self._tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                 for m in prompts]
        encoded = self._tokenizer(texts, return_tensors="pt", padding=True,
                                  add_special_tokens=False).to(self._model.device)
        kwargs: dict[str, Any] = {"max_new_tokens": self.policy.max_new_tokens,
                                  "do_sample": self.policy.do_sample,
                                  "pad_token_id": self._tokenizer.pad_token_id}
        if budget_s is not None:
            kwargs["max_time"] = max(budget_s, 0.1)  # the engine enforces the deadline itself
        with torch.inference_mode():
            output = self._model.generate(**encoded, **kwargs)
        new_tokens = output[:, encoded["input_ids"].shape[1]:]
        return [self._draft(item, label, encoded["attention_mask"][row], new_tokens[row])
                for row, (item, label) in enumerate(zip(items, labels, strict=True))]

    def _draft(self, item: GenerationItem, labels: dict[str, str], mask: Any, tokens: Any) -> Draft:
        # The pad token is often the EOS token: find the first EOS before dropping padding.
        eos_ids = self._eos_ids()
        raw = [int(t) for t in tokens]
        stop = next((i for i, t in enumerate(raw) if t in eos_ids), None)
        produced = raw[:stop] if stop is not None else [t for t in raw
                                                        if t != self._tokenizer.pad_token_id]
        text = self._tokenizer.decode(produced, skip_special_tokens=True).strip()
        return Draft(request_id=item.request_id, text=text, source_labels=labels,
                     prompt_tokens=int(mask.sum()),
                     completion_tokens=len(produced) + (1 if stop is not None else 0),
                     finish_reason="stop" if stop is not None else "length", model=self.name)

    def _eos_ids(self) -> set[int]:
        eos = self._model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos])
        return {i for i in ids if i is not None} | {self._tokenizer.eos_token_id}


class NullGenerator:
    """Returns a fixed text citing the first source. For the orchestration benchmark only."""

    name = "null-generator-benchmark-only"

    def __init__(self, prompts: PromptSet) -> None:
        self.prompts = prompts

    def warm_up(self) -> None:
        return None

    def generate(self, batch: GenerationInput) -> GenerationOutput:
        drafts = []
        for item in batch.items:
            _, labels = self.prompts.messages(item)
            text = "Benchmark output [S1]." if labels else ABSTAIN_TEXT
            drafts.append(Draft(request_id=item.request_id, text=text, source_labels=labels,
                                prompt_tokens=0, completion_tokens=0, finish_reason="stop",
                                model=self.name))
        return GenerationOutput(drafts=drafts)
