"""The lexical (BM25) index, its ACL-restricted search, and reciprocal rank fusion."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tasks.lexical import (
    LEXICAL_DIRNAME,
    LexicalIndex,
    LexicalIndexError,
    reciprocal_rank_fusion,
    tokenize,
)

pytestmark = [pytest.mark.unit]

INCIDENT_CHUNKS = [
    (0, "# INC-2041: route-planner Solve Latency Spike\n\nMap data doubled the road segments."),
    (1, "# INC-2057: Duplicate Invoices from billing-api\n\nRetries without an idempotency key."),
    (2, "# INC-2063: dispatch-gateway EDI Certificate Expired\n\nThe DNS token was rotated."),
    (3, "Every call to PayRail must carry an idempotency key, as invoices were duplicated."),
    (4, "Enable the greedy fallback: acmectl flags set planner.fallback_greedy true"),
]

WORDS = ["invoice", "billing", "planner", "route", "dispatch", "gateway", "certificate", "latency",
         "retry", "key", "queue", "alert", "backup", "restore", "tenant", "policy"]


def _random_corpus(rng: random.Random, size: int) -> list[tuple[int, str]]:
    # Ids are deliberately not 0..n-1, so an id/row mix-up would show.
    return [(1000 + 7 * i, " ".join(rng.choices(WORDS, k=rng.randint(3, 25)))) for i in range(size)]


def test_search_ranks_the_chunk_with_an_exact_identifier_first() -> None:
    # Given incident chunks whose identifiers differ only in their digits
    index = LexicalIndex.build(INCIDENT_CHUNKS)
    everything = [vid for vid, _ in INCIDENT_CHUNKS]

    # When a question names one incident and one flag
    by_incident = index.search("What was the root cause of INC-2057?", everything, top_k=3)
    by_flag = index.search("planner.fallback_greedy", everything, top_k=3)

    # Then the chunk carrying that identifier comes first
    assert by_incident[0][0] == 1
    assert by_flag[0][0] == 4
    # and clearly first: other incidents share only the common part ('inc', 'planner')
    assert by_incident[0][1] > 2 * by_incident[1][1]
    assert by_flag[0][1] > 2 * by_flag[1][1]


def test_search_returns_nothing_when_no_allowed_chunk_shares_a_term() -> None:
    index = LexicalIndex.build(INCIDENT_CHUNKS)

    assert index.search("idempotency", [0, 2, 4], top_k=5) == []
    # Other incidents still match on 'inc'; the chunk that names INC-2057 is not allowed here.
    others = index.search("INC-2057", [0, 2, 4], top_k=5)
    assert others and {vid for vid, _ in others} <= {0, 2, 4}
    assert index.search("zebra quokka", [0, 1, 2, 3, 4], top_k=5) == []
    assert index.search("the of and", [0, 1, 2, 3, 4], top_k=5) == []  # stopwords only
    assert index.search("INC-2057", [], top_k=5) == []


def test_search_never_returns_a_disallowed_id_and_keeps_the_best_allowed() -> None:
    rng = random.Random(20240503)
    corpus = _random_corpus(rng, 120)
    index = LexicalIndex.build(corpus)
    all_ids = [vid for vid, _ in corpus]
    for _ in range(300):
        # Given a random allowed set (sometimes tiny, sometimes nearly everything) and query
        allowed = set(rng.sample(all_ids, rng.randint(1, len(all_ids))))
        query = " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))
        top_k = rng.randint(1, 15)

        # When searching under that set
        hits = index.search(query, sorted(allowed), top_k)

        # Then every hit is allowed, and the hits are the best allowed ones in order:
        # the full ranking restricted to the allowed set, not a global top-k cut first
        assert {vid for vid, _ in hits} <= allowed
        full = index.search(query, all_ids, top_k=len(all_ids))
        assert hits == [h for h in full if h[0] in allowed][:top_k]


def test_search_ignores_allowed_ids_that_are_not_in_the_index() -> None:
    index = LexicalIndex.build(INCIDENT_CHUNKS)

    hits = index.search("idempotency key invoices", [1, 3, 99, -5], top_k=5)

    assert {vid for vid, _ in hits} == {1, 3}


def test_search_returns_each_chunk_once_when_an_allowed_id_repeats() -> None:
    index = LexicalIndex.build(INCIDENT_CHUNKS)

    hits = index.search("idempotency key invoices", [3, 1, 3, 1, 3], top_k=5)

    assert sorted(vid for vid, _ in hits) == [1, 3]


def test_search_breaks_score_ties_by_the_smaller_id() -> None:
    index = LexicalIndex.build([(30, "alpha beta"), (10, "alpha beta"), (20, "alpha beta")])

    hits = index.search("alpha", [30, 20, 10], top_k=3)

    assert [vid for vid, _ in hits] == [10, 20, 30]
    assert len({score for _, score in hits}) == 1


def test_search_rejects_a_non_positive_top_k() -> None:
    index = LexicalIndex.build(INCIDENT_CHUNKS)

    with pytest.raises(ValueError, match="top_k must be > 0, got 0"):
        index.search("INC-2057", [1], top_k=0)


def test_build_rejects_an_empty_corpus_and_repeated_ids() -> None:
    with pytest.raises(ValueError, match="at least one chunk"):
        LexicalIndex.build([])
    with pytest.raises(ValueError, match="unique"):
        LexicalIndex.build([(1, "alpha"), (1, "beta")])


def test_tokenize_splits_identifiers_and_folds_plurals() -> None:
    assert tokenize("INC-2057: planner.fallback_greedy invoices") == [
        "inc", "2057", "planner", "fallback", "greedy", "invoice"]
    assert tokenize("What are the policies for SEV1?") == ["policy", "sev1"]


def test_save_and_load_round_trip_gives_the_same_results(tmp_path: Path) -> None:
    # Given a built index saved beside (what would be) the FAISS files
    rng = random.Random(7)
    corpus = _random_corpus(rng, 80)
    built = LexicalIndex.build(corpus)
    folder = tmp_path / "idx-test" / LEXICAL_DIRNAME
    folder.parent.mkdir()
    built.save(folder)

    # When it is loaded back
    loaded = LexicalIndex.load(folder)

    # Then it holds the same ids and answers every query identically
    assert len(loaded) == len(built)
    assert loaded.vector_ids.tolist() == [vid for vid, _ in corpus]
    ids = [vid for vid, _ in corpus]
    for _ in range(50):
        query = " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))
        allowed = rng.sample(ids, rng.randint(1, len(ids)))
        assert loaded.search(query, allowed, 10) == built.search(query, allowed, 10)
    assert not (folder.parent / f"{LEXICAL_DIRNAME}.tmp").exists()


def test_save_replaces_an_existing_index(tmp_path: Path) -> None:
    folder = tmp_path / LEXICAL_DIRNAME
    LexicalIndex.build([(1, "alpha")]).save(folder)

    LexicalIndex.build([(2, "beta"), (3, "gamma")]).save(folder)

    loaded = LexicalIndex.load(folder)
    assert loaded.vector_ids.tolist() == [2, 3]
    assert loaded.search("beta", [1, 2, 3], 5) == LexicalIndex.build([(2, "beta"), (3, "gamma")]).search(
        "beta", [1, 2, 3], 5)


def test_load_refuses_a_missing_folder_and_another_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(LexicalIndexError, match="no lexical index"):
        LexicalIndex.load(tmp_path / "absent")

    folder = tmp_path / LEXICAL_DIRNAME
    LexicalIndex.build(INCIDENT_CHUNKS).save(folder)
    meta = next(p for p in folder.iterdir() if p.name == "lexical.json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "tokenizer": "old-v0"}))
    with pytest.raises(LexicalIndexError, match="old-v0"):
        LexicalIndex.load(folder)


def test_rrf_orders_a_hand_made_example() -> None:
    # Given two rankings that agree on 1 and 3 but in different places
    dense, lexical = [1, 2, 3], [3, 1, 4]

    # When they are fused with k = 60
    fused = reciprocal_rank_fusion([dense, lexical], k=60)

    # Then 1 (ranks 1 and 2) beats 3 (ranks 3 and 1), and both beat ids in one list only
    assert [item for item, _ in fused] == [1, 3, 2, 4]
    scores = dict(fused)
    assert scores[1] == pytest.approx(1 / 61 + 1 / 62)
    assert scores[3] == pytest.approx(1 / 63 + 1 / 61)
    assert scores[2] == pytest.approx(1 / 62)
    assert scores[4] == pytest.approx(1 / 63)


def test_rrf_smaller_k_rewards_top_ranks_more() -> None:
    # 7 is first in one list only; 8 is fourth in both
    rankings = [[7, 1, 2, 8], [3, 4, 5, 8]]

    assert reciprocal_rank_fusion(rankings, k=60)[0][0] == 8  # 2/64 > 1/61
    assert reciprocal_rank_fusion(rankings, k=1)[0][0] == 7  # 1/2 > 2/5


def test_rrf_breaks_ties_by_best_rank_then_by_the_earlier_ranking() -> None:
    # Equal scores, equal best rank: the id first in the earlier ranking wins
    assert [i for i, _ in reciprocal_rank_fusion([[5, 6], [6, 5]])] == [5, 6]
    assert [i for i, _ in reciprocal_rank_fusion([[9], [2]])] == [9, 2]
    assert [i for i, _ in reciprocal_rank_fusion([[2], [9]])] == [2, 9]
    # 10 and 11 tie (ranks 1 and 3 each) and lead 12 (rank 2 twice): 10 is first in list 0
    fused = reciprocal_rank_fusion([[10, 12, 11], [11, 12, 10]], k=60)
    assert [i for i, _ in fused] == [10, 11, 12]
    assert fused[0][1] == fused[1][1] > fused[2][1]


def test_rrf_counts_a_repeated_id_once_per_ranking_and_rejects_bad_k() -> None:
    assert reciprocal_rank_fusion([[4, 4, 5]], k=60) == [(4, 1 / 61), (5, 1 / 62)]
    assert reciprocal_rank_fusion([]) == []
    with pytest.raises(ValueError, match="k must be > 0, got -3"):
        reciprocal_rank_fusion([[1]], k=-3)
