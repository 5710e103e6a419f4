"""Chat turns rendered by a model's own chat template, for the backends that hold its
tokenizer: a template without a system turn (Gemma's) gets the system text at the head of
the first user turn; a template's own refusal is the request's trouble (`RequestRejected`)."""

from __future__ import annotations

from typing import Any

from jinja2.exceptions import TemplateError

from tasks.engine.types import RequestRejected


class ChatTemplate:
    """A tokenizer's chat template, checked once (`ValueError` at load, not per request)."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.fold_system = _system_role_refused(tokenizer, name)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's token ids, the generation prompt included."""
        if self.fold_system:
            messages = system_folded(messages)
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False)
        except TemplateError as exc:
            raise RequestRejected(f"the chat template rejects these messages: {exc}") from exc
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _system_role_refused(tokenizer: Any, name: str) -> bool:
    """Whether the chat template refuses a system turn. Raises ValueError when there is no
    chat template, or it cannot render a user turn: Sluice sends chat turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{name}: the tokenizer has no chat template, and Sluice sends chat "
                         f"turns (system, user): use an instruction-tuned model, or give its "
                         f"tokenizer_config.json a chat_template")
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    try:
        tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return False
    except TemplateError:
        pass
    try:
        tokenizer.apply_chat_template(turns[1:], add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:
        raise ValueError(f"{name}: the chat template cannot render a user turn: {exc}") from exc
    return True


def system_folded(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The system turns' text put before the first user turn's, for templates without one."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system and rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    elif system:
        rest.insert(0, {"role": "user", "content": system})
    return rest
