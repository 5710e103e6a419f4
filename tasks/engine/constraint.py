"""JSON-schema constrained decoding for the `transformers` backend's own decoding loop.

Grammars come from `xgrammar` (a maintained JSON-schema-to-grammar compiler and token
matcher); this module only adapts it to the loop: per step and constrained row the loop calls
`mask_logits(row_logits)`, picks a token, `accept(token)`, and ends the row when
`is_complete()` or the token is EOS. EOS is allowed exactly when the JSON value is complete.

JSON is compact (no whitespace outside strings): a small model cannot pad the output with
runs of spaces, and the schema's length bounds translate directly into tokens. xgrammar's
length-bounded strings admit no escape sequences, so bounded strings hold no quotes or
newlines.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from tasks.engine.types import EngineError, RequestRejected

if TYPE_CHECKING:
    import torch

_BITS = 32  # xgrammar packs the allowed-token mask into int32 words


class ConstraintViolation(EngineError):
    """A token the output's schema does not allow at that point of the output."""


class UnsupportedSchema(RequestRejected):
    """A JSON schema that the grammar compiler cannot turn into a grammar."""


class RowConstraint:
    """One row's position in its schema's grammar. Not thread-safe: one per decoding row."""

    def __init__(self, xgr: Any, matcher: Any, vocab_size: int, stop_words: torch.Tensor,
                 describe: Callable[[int], str]) -> None:
        self._xgr = xgr
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._not_stop = ~stop_words  # the mask words with every bit but the stop tokens' set
        self._describe = describe
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._filled = False  # the bitmask holds the current step's allowed tokens

    def mask_logits(self, logits: torch.Tensor) -> None:
        """Set every token the schema does not allow next to -inf, in place. `logits` is one
        row: 1-D, at least the model's vocabulary long (extra padding ids are disallowed)."""
        if logits.dim() != 1 or logits.shape[0] < self._vocab_size:
            raise ValueError(f"logits must be 1-D with at least {self._vocab_size} entries, "
                             f"got shape {tuple(logits.shape)}")
        bitmask = self._allowed().to(logits.device)
        backend = "cpu" if logits.device.type == "cpu" else "torch_native"  # no kernel JIT
        self._xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), bitmask,
                                              vocab_size=self._vocab_size, backend=backend)
        logits[self._vocab_size:] = float("-inf")

    def accept(self, token_id: int) -> None:
        """Advance past `token_id`; ConstraintViolation when the schema does not allow it."""
        if not self._matcher.accept_token(int(token_id)):
            raise ConstraintViolation(f"token {token_id} ({self._describe(token_id)}) is not "
                                      "allowed here by the output's JSON schema")
        self._filled = False

    def is_complete(self) -> bool:
        """The JSON value is complete and nothing but EOS may follow: the row must stop."""
        if self._matcher.is_terminated():
            return True
        if not self._matcher.is_completed():
            return False
        return not bool((self._allowed()[0] & self._not_stop).any())

    def _allowed(self) -> torch.Tensor:
        if not self._filled:
            self._matcher.fill_next_token_bitmask(self._bitmask)
            self._filled = True
        return self._bitmask


class JsonSchemaConstraints:
    """Row constraints for one tokenizer. Compiled grammars are cached per schema (by its
    compact JSON, key order kept), so every row of a template shares one compilation. Fields
    are written in the order of the schema's `properties`."""

    def __init__(self, tokenizer: Any, vocab_size: int,
                 stop_token_ids: Iterable[int] | None = None, cache_size: int = 64,
                 compile_threads: int = 1) -> None:
        """`vocab_size` is the model's (config.vocab_size), which may exceed the tokenizer's;
        `stop_token_ids` defaults to the tokenizer's EOS and should be every id the decoding
        loop treats as EOS."""
        import xgrammar as xgr

        stops = _stop_ids(tokenizer, stop_token_ids)
        if vocab_size <= 0 or not stops or max(stops) >= vocab_size:
            raise ValueError(f"vocab_size must be > 0 and cover the stop ids {stops}, got {vocab_size}")
        self._xgr = xgr
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stops
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stops))
        self._compiler = xgr.GrammarCompiler(info, max_threads=compile_threads, cache_enabled=False)
        self._stop_words = _bit_words(stops, vocab_size)
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def for_schema(self, schema: dict[str, Any]) -> RowConstraint:
        """A fresh constraint at the start of a value of `schema`."""
        return RowConstraint(self._xgr, self._xgr.GrammarMatcher(self._grammar(schema)),
                             self.vocab_size, self._stop_words, self._describe)

    def _grammar(self, schema: dict[str, Any]) -> Any:
        # Key order is kept: the order of `properties` is the order the fields are written in.
        key = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
            try:
                grammar = self._compiler.compile_json_schema(
                    key, any_whitespace=False, separators=(",", ":"), strict_mode=True)
            except (RuntimeError, ValueError) as exc:
                raise UnsupportedSchema(f"the JSON schema cannot be compiled: {exc}") from exc
            self._compiled[key] = grammar
            if len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
            return grammar

    def _describe(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            return "outside the vocabulary"
        return repr(self._tokenizer.decode([token_id]))


def _stop_ids(tokenizer: Any, given: Iterable[int] | None) -> tuple[int, ...]:
    ids = list(given) if given is not None else [tokenizer.eos_token_id]
    return tuple(sorted({int(i) for i in ids if i is not None}))


def _bit_words(token_ids: Iterable[int], vocab_size: int) -> torch.Tensor:
    """xgrammar's packed mask layout (bit i % 32 of int32 word i // 32) with `token_ids` set."""
    import torch

    words = [0] * ((vocab_size + _BITS - 1) // _BITS)
    for token_id in token_ids:
        words[token_id // _BITS] |= 1 << (token_id % _BITS)
    signed = [w - (1 << _BITS) if w >= 1 << (_BITS - 1) else w for w in words]
    return torch.tensor(signed, dtype=torch.int32)
