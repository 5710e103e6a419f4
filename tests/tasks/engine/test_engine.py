"""The batching engine on the real default model: batching correctness, token budgets,
out-of-memory splitting, deadlines, stop strings and deterministic sampled replay."""

from __future__ import annotations

import threading
import time

import pytest

from tasks.engine.engine import BatchLimits, GenerationEngine
from tasks.engine.hf import TransformersBackend
from tasks.engine.types import AcceleratorOutOfMemory, Completion, DecodingPolicy, GenerationRequest

pytestmark = [pytest.mark.unit]

QUESTIONS = ["What is the capital of France?", "Say hello to the new team.",
             "Name three primary colours.", "What does a database index do?",
             "Write one sentence about the sea.", "Why do servers need monitoring?"]
GREEDY = DecodingPolicy(name="test-greedy", max_new_tokens=12)
SAMPLED = DecodingPolicy(name="test-sampled", temperature=1.0, top_p=0.95, max_new_tokens=12)


def _requests(policy: DecodingPolicy = GREEDY, prefix: str = "q") -> list[GenerationRequest]:
    return [GenerationRequest(f"{prefix}{i}", [{"role": "user", "content": q}], policy,
                              seed=policy.request_seed(f"{prefix}{i}"))
            for i, q in enumerate(QUESTIONS)]


class _Around:
    """The real backend, passed through: the injected faults below change its `generate`."""

    def __init__(self, backend: TransformersBackend) -> None:
        self.backend = backend
        self.kind, self.model_id = backend.kind, backend.model_id
        self.context_window = backend.context_window

    def warm_up(self) -> None:
        self.backend.warm_up()

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return self.backend.count_prompt_tokens(messages)

    def kv_bytes_per_token(self) -> int | None:
        return self.backend.kv_bytes_per_token()


class OutOfMemoryAbove(_Around):
    """An injected fault: the real backend, but any batch above `rows` runs out of memory."""

    def __init__(self, backend: TransformersBackend, rows: int) -> None:
        super().__init__(backend)
        self.rows = rows
        self.sizes: list[int] = []

    def generate(self, batch: list[GenerationRequest]) -> list[Completion]:
        self.sizes.append(len(batch))
        if len(batch) > self.rows:
            raise AcceleratorOutOfMemory(f"injected: {len(batch)} rows > {self.rows}")
        return self.backend.generate(batch)


@pytest.fixture(scope="module")
def engine(hf_backend: TransformersBackend) -> GenerationEngine:
    engine = GenerationEngine(hf_backend, BatchLimits(max_batch_size=8, gather_s=0.02))
    engine.warm_up()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def one_by_one(hf_backend: TransformersBackend) -> dict[str, str]:
    return {r.request_id: hf_backend.generate([r])[0].text for r in _requests()}


def test_batched_greedy_outputs_equal_unbatched(engine: GenerationEngine,
                                                one_by_one: dict[str, str]) -> None:
    # Left padding with a masked attention and positions counted from each row's first real
    # token gives every row the logits it gets alone; float32 on CPU keeps the argmax equal.
    # (In bfloat16 on a GPU, padded matmuls can round differently and flip a near-tie.)
    completions = engine.generate(_requests())

    assert {c.batch_size for c in completions} == {len(QUESTIONS)}
    assert {c.request_id: c.text for c in completions} == one_by_one
    assert all(c.text and c.completion_tokens > 0 for c in completions)


def test_concurrent_callers_share_batches(engine: GenerationEngine) -> None:
    results: list[list[Completion]] = []
    start = threading.Barrier(3)

    def call(prefix: str) -> None:
        start.wait()
        results.append(engine.generate(_requests(prefix=prefix)[:2]))

    threads = [threading.Thread(target=call, args=(p,)) for p in ("a", "b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    sizes = [c.batch_size for result in results for c in result]
    assert len(sizes) == 6
    assert max(sizes) > 2  # rows of different callers decoded in one batch


def test_a_full_batch_runs_without_waiting_out_the_gather_time(
        hf_backend: TransformersBackend, one_by_one: dict[str, str]) -> None:
    # Two full batches of three: with a ten-minute gather time, waiting it out would hang.
    engine = GenerationEngine(hf_backend, BatchLimits(max_batch_size=3, gather_s=600.0))
    done: list[list[Completion]] = []
    caller = threading.Thread(target=lambda: done.append(engine.generate(_requests())),
                              daemon=True)
    try:
        caller.start()
        caller.join(timeout=120)
        assert done, "the engine waited for more work although each batch was full"
    finally:
        engine.close()

    assert [c.batch_size for c in done[0]] == [3] * len(QUESTIONS)
    assert engine.batches_run == 2
    assert {c.request_id: c.text for c in done[0]} == one_by_one


def test_token_budget_refuses_what_can_never_fit(hf_backend: TransformersBackend) -> None:
    kv = hf_backend.kv_bytes_per_token()
    assert kv == 2 * 30 * 3 * 64 * 4  # SmolLM2-135M: 30 layers, 3 KV heads of 64, float32
    small = GenerationEngine(hf_backend, BatchLimits(kv_budget_bytes=kv * 80))
    huge_output = DecodingPolicy(max_new_tokens=hf_backend.context_window)
    requests = [GenerationRequest("fits", [{"role": "user", "content": "Hi"}], GREEDY),
                GenerationRequest("too-long-for-budget",
                                  [{"role": "user", "content": "word " * 100}], GREEDY),
                GenerationRequest("beyond-context", [{"role": "user", "content": "Hi"}],
                                  huge_output)]
    try:
        fits, budget, context = small.generate(requests)
    finally:
        small.close()

    assert fits.finish_reason in ("stop", "length") and fits.text
    assert budget.finish_reason == "refused" and "KV-cache budget of 80 tokens" in budget.error
    assert context.finish_reason == "refused" and "context window" in context.error
    assert budget.completion_tokens == context.completion_tokens == 0


def test_token_budget_bounds_batch_rows(hf_backend: TransformersBackend) -> None:
    requests = _requests()
    need = max(hf_backend.count_prompt_tokens(r.messages) for r in requests) + GREEDY.max_new_tokens
    kv = hf_backend.kv_bytes_per_token()
    engine = GenerationEngine(hf_backend, BatchLimits(kv_budget_bytes=kv * need * 2,
                                                      gather_s=0.02))
    try:
        completions = engine.generate(requests)
    finally:
        engine.close()

    assert max(c.batch_size for c in completions) <= 2
    assert engine.batches_run >= 3
    assert all(c.finish_reason in ("stop", "length") for c in completions)


def test_out_of_memory_splits_and_loses_nothing(hf_backend: TransformersBackend,
                                                one_by_one: dict[str, str]) -> None:
    faulty = OutOfMemoryAbove(hf_backend, rows=2)
    engine = GenerationEngine(faulty, BatchLimits(max_batch_size=8, gather_s=0.02))
    try:
        completions = engine.generate(_requests())
    finally:
        engine.close()

    assert faulty.sizes[0] == len(QUESTIONS)  # tried whole, then halves, then quarters
    assert max(c.batch_size for c in completions) <= 2
    assert {c.request_id: c.text for c in completions} == one_by_one


def test_out_of_memory_on_one_row_is_an_error_not_a_loss(hf_backend: TransformersBackend) -> None:
    engine = GenerationEngine(OutOfMemoryAbove(hf_backend, rows=0), BatchLimits(gather_s=0.0))
    try:
        completions = engine.generate(_requests()[:3])
    finally:
        engine.close()

    assert [c.finish_reason for c in completions] == ["error"] * 3
    assert all("injected" in (c.error or "") for c in completions)


def test_sampled_replay_reproduces_output(engine: GenerationEngine) -> None:
    # Given a sampling policy, each request's sampler is seeded from the request alone
    first = engine.generate(_requests(SAMPLED))
    # When the same requests run again, in another batch composition too
    again = engine.generate(_requests(SAMPLED))
    alone = engine.generate(_requests(SAMPLED)[2:3])
    # Then every output is reproduced; another seed changes at least one
    assert [c.text for c in again] == [c.text for c in first]
    assert alone[0].text == first[2].text
    reseeded = [GenerationRequest(r.request_id, r.messages, r.policy, seed=r.seed + 1)
                for r in _requests(SAMPLED)]
    assert [c.text for c in engine.generate(reseeded)] != [c.text for c in first]


def test_stop_strings_end_a_row(engine: GenerationEngine) -> None:
    policy = DecodingPolicy(name="stop-at-period", max_new_tokens=40, stop=("Paris",))
    request = GenerationRequest("stop", [{"role": "user",
                                          "content": "What is the capital of France?"}], policy)
    [completion] = engine.generate([request])

    assert completion.finish_reason == "stop"
    assert "Paris" not in completion.text


def test_deadline_already_passed_is_not_decoded(engine: GenerationEngine) -> None:
    request = _requests()[0]
    request.deadline = time.monotonic() - 1
    [completion] = engine.generate([request])

    assert completion.finish_reason == "deadline"
    assert completion.text == "" and completion.completion_tokens == 0


def test_accounting_is_filled(engine: GenerationEngine) -> None:
    completions = engine.generate(_requests()[:3])

    for c in completions:
        assert c.prompt_tokens > 0 and c.completion_tokens > 0
        assert c.compute_s > 0 and c.queue_wait_s >= 0 and c.batch_size == 3
        assert c.backend == "transformers" and c.model.startswith("SmolLM2-135M-Instruct")


def test_a_request_at_fault_ends_in_error_and_its_batch_mates_are_decoded(
        hf_backend: TransformersBackend, one_by_one: dict[str, str]) -> None:
    # Given a batch whose second request has a schema the grammar compiler refuses
    bad = GenerationRequest("bad", [{"role": "user", "content": "x"}], GREEDY, json_schema={
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}})
    good = _requests()[:2]

    # When the batch runs
    first, failed, second = hf_backend.generate([good[0], bad, good[1]])

    # Then only that request fails, with its reason, and the others are what they are alone
    assert failed.finish_reason == "error" and failed.error and failed.completion_tokens == 0
    assert (first.text, second.text) == (one_by_one["q0"], one_by_one["q1"])
    assert first.batch_size == second.batch_size == 2


GEMMA_LIKE = ("{% for m in messages %}{% if m['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}"
              "<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _with_template(hf_backend: TransformersBackend, template: str | None) -> TransformersBackend:
    import copy

    tokenizer = copy.deepcopy(hf_backend.tokenizer)
    tokenizer.chat_template = template
    return TransformersBackend.from_loaded(hf_backend.model, tokenizer, "other-model")


def test_a_template_without_a_system_turn_gets_the_system_text_in_the_user_turn(
        hf_backend: TransformersBackend) -> None:
    backend = _with_template(hf_backend, GEMMA_LIKE)
    messages = [{"role": "system", "content": "Answer from the sources."},
                {"role": "user", "content": "What is the capital of France?"}]

    prompt = backend.tokenizer.decode(backend._encode(messages))
    [completion] = backend.generate([GenerationRequest("g", messages, GREEDY)])

    assert prompt.startswith("<start_of_turn>user\nAnswer from the sources.\n\nWhat is the")
    assert completion.finish_reason in ("stop", "length") and completion.error is None


def test_messages_a_chat_template_rejects_end_in_error_alone_through_the_engine(
        hf_backend: TransformersBackend) -> None:
    strict = ("{% for m in messages %}{% if 'forbidden' in m['content'] %}"
              "{{ raise_exception('no such content') }}{% endif %}"
              "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    engine = GenerationEngine(_with_template(hf_backend, strict), BatchLimits(gather_s=0.0))
    try:
        bad = GenerationRequest("bad", [{"role": "user", "content": "forbidden"}], GREEDY)
        good = _requests()[0]
        failed, done = engine.generate([bad, good])
    finally:
        engine.close()

    assert failed.finish_reason == "error" and "no such content" in (failed.error or "")
    assert done.finish_reason in ("stop", "length") and done.text


def test_a_model_without_a_chat_template_is_refused_when_it_loads(
        hf_backend: TransformersBackend) -> None:
    with pytest.raises(ValueError, match="other-model: the tokenizer has no chat template"):
        _with_template(hf_backend, None)


class HeldBatches(_Around):
    """An injected slow stage: the real backend, but each batch waits until `release` is set;
    `returned` is set once a batch has returned."""

    def __init__(self, backend: TransformersBackend) -> None:
        super().__init__(backend)
        self.release, self.returned = threading.Event(), threading.Event()

    def generate(self, batch: list[GenerationRequest]) -> list[Completion]:
        self.release.wait(timeout=30)
        try:
            return self.backend.generate(batch)
        finally:
            self.returned.set()


def test_a_caller_is_not_held_past_its_deadline_by_a_batch_that_runs_on(
        hf_backend: TransformersBackend) -> None:
    held = HeldBatches(hf_backend)
    engine = GenerationEngine(held, BatchLimits(gather_s=0.0))
    try:
        request = _requests()[0]
        request.deadline = time.monotonic() + 0.2
        # When its batch is still running at its deadline
        [completion] = engine.generate([request])
        # Then its caller gets a deadline completion without waiting for the batch
        assert not held.returned.is_set()
        assert completion.finish_reason == "deadline"
        assert completion.error == "deadline passed while its batch ran"
    finally:
        held.release.set()
        engine.close()
