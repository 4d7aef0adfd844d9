"""Memory-store speed and scale: write throughput, retrieval latency p50/p99 (exact and HNSW), HNSW recall@10.

Glossary: N stored items, D embedding width, Q queries.

For each N in --sizes a fresh `VectorStore` file (SQLite WAL, sqlite-vec exact search) is filled with N items
whose embeddings are drawn, not computed, so the figures are the storage layer's: clustered unit vectors (a mixture
of N/100 Gaussian centres plus noise, like embeddings of related texts; `--data=gaussian`: no structure, the
hardest case for a graph index), D = --dim; queries are stored vectors plus noise. Measured:
- batched write throughput (items/s): `write_many` of 1000 items per transaction, over all N;
- single-write throughput: 200 more writes of one item, one transaction each;
- retrieval latency p50/p99 of `retrieve_vector(q, 10)` (the store's whole path: search, SQL filter of hidden and
  expired items, use counts), exact and through the usearch HNSW index (`index="approx"` at `ApproxIndex`'s default
  connectivity M, ef_construction and ef_search);
- recall@10 of the HNSW path against exact search over the same queries (the acceptance bar is >= 0.95 at 1e5).

`--backends=sqlite,pg` also runs the same store on PostgreSQL + pgvector (`pg.PostgresDB`; a throwaway local server
from this machine's PostgreSQL binaries unless --pg_dsn names one): its retrieval is pgvector's HNSW, its recall@10
is against a numpy brute force over the same vectors.

COMMAND: .venv/bin/python -m scripts.bench.memory --sizes=1000,100000,1000000 --no_append
(--hnsw_max=100000 skips the HNSW build above 1e5, which takes long on a shared 2-core CPU; "nan" in its columns;
--ef_sweep=128,256,512,1024 instead measures the bare HNSW index's recall@10 against its ef_search)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import tempfile
import time

import numpy as np

from framework import memory
from scripts.bench import common


def _vectors(rng: np.random.Generator, n: int, dim: int, data: str = "clustered") -> np.ndarray:
    if data == "gaussian":  # no structure at all: the hardest case for a graph index
        x_ND = rng.standard_normal((n, dim)).astype(np.float32)
        return x_ND / np.linalg.norm(x_ND, axis=1, keepdims=True)
    centres_CD = rng.standard_normal((max(n // 100, 1), dim)).astype(np.float32)
    x_ND = centres_CD[rng.integers(len(centres_CD), size=n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x_ND / np.linalg.norm(x_ND, axis=1, keepdims=True)


def _queries(rng: np.random.Generator, x_ND: np.ndarray, queries: int) -> np.ndarray:
    """[Q, D] queries: stored unit vectors plus noise of norm ~0.8 at every width D (0.1 per coordinate at D = 64)."""
    n, dim = x_ND.shape
    rows_Q = rng.integers(n, size=queries)  # drawn first: the same queries as before at D = 64
    return x_ND[rows_Q] + float(np.sqrt(64 / dim)) * 0.1 * rng.standard_normal((queries, dim)).astype(np.float32)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def _exact_ids(x_ND: np.ndarray, q_QD: np.ndarray, k: int = 10) -> np.ndarray:
    """[Q, k] item ids (from 1, in write order) of the exact cosine neighbours of unit rows `x_ND`, by brute force."""
    q_QD = q_QD / np.linalg.norm(q_QD, axis=1, keepdims=True)
    return np.argsort(-(q_QD @ x_ND.T), axis=1)[:, :k] + 1


def bench_size(
    n: int,
    dim: int,
    queries: int,
    workdir: str,
    seed: int = 0,
    hnsw: bool = True,
    data: str = "clustered",
    dsn: str | None = None,
    ef_search: int = 100,
    sqlite_optimize: bool = False,
) -> dict:
    """Fills a store with n items and measures writes, exact and approximate retrieval, and recall@10.

    With `dsn` the store is a `pg.PostgresDB` schema on that server instead of a SQLite file: its retrieval is
    pgvector's HNSW (`ef_search`), and recall@10 is against a numpy brute force over the same vectors.
    """
    rng = np.random.default_rng([seed, n])
    x_ND = _vectors(rng, n, dim, data)
    path = os.path.join(workdir, f"bench_{n}.db")
    emb = memory.HashEmbedder(dim)  # only names the width: the vectors are passed in
    if dsn is None:
        store = memory.VectorStore(path, embedder=emb)
    else:
        from framework.memory import pg

        schema = f"bench_{n}_{os.getpid()}"
        backend = pg.PostgresDB(dsn, store_kind="vector", embed_dim=dim, schema=schema, ef_search=ef_search)
        store = memory.VectorStore(backend, embedder=emb)
    t0 = time.perf_counter()
    for lo in range(0, n, 1000):
        hi = min(lo + 1000, n)
        store.write_many([memory.Event(f"item {i}.", time=float(i)) for i in range(lo, hi)], x_ND[lo:hi])
    batched = n / (time.perf_counter() - t0)
    extra_ND = _vectors(rng, 200, dim, data)
    t0 = time.perf_counter()
    for j in range(200):
        store.write_many([memory.Event(f"extra {j}.", time=float(n + j))], extra_ND[j : j + 1])
    single = 200 / (time.perf_counter() - t0)
    if sqlite_optimize and dsn is None:  # table statistics for SQLite's planner (kept in the file)
        store.db.execute("PRAGMA optimize=0x10002")
    q_QD = _queries(rng, x_ND, queries)
    common = dict(n=n, dim=dim, data=data, queries=queries, write_batched_per_s=batched, write_single_per_s=single)
    exact_ids, exact_s = [], []
    for q in q_QD:
        t0 = time.perf_counter()
        exact_ids.append([i.id for i in store.retrieve_vector(q, 10)])
        exact_s.append(time.perf_counter() - t0)
    if dsn is not None:  # the store's search was pgvector's HNSW: compare it with the exact neighbours
        size_mb = (
            store.db.query(
                "SELECT SUM(pg_total_relation_size(c.oid)) FROM pg_class c "
                "JOIN pg_namespace s ON s.oid = c.relnamespace WHERE s.nspname = ? AND c.relkind = 'r'",
                (schema,),
            )[0][0]
            / 2**20
        )
        plan = store.db.query(
            "EXPLAIN SELECT id, embedding <=> ?::vector AS d FROM vec_items WHERE active ORDER BY d LIMIT 40",
            (pg._vector_literal(q_QD[0]),),
        )
        knn_plan = "hnsw" if any("vec_items_hnsw" in r[0] for r in plan) else "exact scan"  # the planner's choice
        t0 = time.perf_counter()
        store.db.rebuild_index()  # the one-pass build from the table (what a bulk load would cost instead)
        build_s = time.perf_counter() - t0
        store.db.execute(f"DROP SCHEMA {schema} CASCADE")
        store.close()
        exact_QK = _exact_ids(np.concatenate([x_ND, extra_ND]), q_QD)
        return dict(
            backend="postgres",
            **common,
            ef_search=ef_search,
            knn_plan=knn_plan,
            file_mb=float(size_mb),
            exact_p50_ms=float("nan"),
            exact_p99_ms=float("nan"),
            hnsw_build_s=build_s,
            approx_p50_ms=_pct(exact_s, 50),
            approx_p99_ms=_pct(exact_s, 99),
            recall_at_10=memory.recall_at_k(exact_QK, np.array(exact_ids)),
        )
    store.close()
    size_mb = sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s)) / 2**20
    build_s, approx_ids, approx_s = float("nan"), exact_ids, [float("nan")]
    if hnsw:
        t0 = time.perf_counter()
        approx = memory.VectorStore(path, embedder=emb, index="approx")  # builds the HNSW index from the file
        build_s = time.perf_counter() - t0
        approx_ids, approx_s = [], []
        for q in q_QD:
            t0 = time.perf_counter()
            approx_ids.append([i.id for i in approx.retrieve_vector(q, 10)])
            approx_s.append(time.perf_counter() - t0)
        approx.close()
    for suffix in ("", "-wal", "-shm", ".usearch", ".usearch.json"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    return dict(
        backend="sqlite",
        sqlite_optimize=sqlite_optimize,
        **common,
        file_mb=size_mb,
        exact_p50_ms=_pct(exact_s, 50),
        exact_p99_ms=_pct(exact_s, 99),
        hnsw_build_s=build_s,
        approx_p50_ms=_pct(approx_s, 50),
        approx_p99_ms=_pct(approx_s, 99),
        recall_at_10=memory.recall_at_k(np.array(exact_ids), np.array(approx_ids)) if hnsw else float("nan"),
    )


def ef_sweep(n: int, dim: int, queries: int, data: str, efs: list[int], seed: int = 0, **settings) -> dict:
    """Recall@10 and time per query of the bare HNSW index against ef_search (`settings`: connectivity and
    expansion_add, else `ApproxIndex`'s defaults).

    The exact neighbours come from a numpy brute force over the same vectors and queries as `bench_size`.
    """
    rng = np.random.default_rng([seed, n])
    x_ND = _vectors(rng, n, dim, data)
    q_QD = _queries(rng, x_ND, queries)
    q_QD /= np.linalg.norm(q_QD, axis=1, keepdims=True)
    exact_QK = _exact_ids(x_ND, q_QD)
    ann = memory.ApproxIndex(dim, **settings)
    t0 = time.process_time()
    ann.add(np.arange(1, n + 1), x_ND)
    out = dict(n=n, dim=dim, data=data, queries=queries, build_cpu_s=time.process_time() - t0, sweep=[])
    out.update({k: v for k, v in ann.settings.items() if k != "expansion_search"})
    print(out, flush=True)
    for ef in efs:
        ann.index.expansion_search = int(ef)
        t0 = time.perf_counter()
        got_QK = ann.search_batch(q_QD, 10)
        ms = (time.perf_counter() - t0) / queries * 1e3
        out["sweep"].append(dict(ef_search=int(ef), recall_at_10=memory.recall_at_k(exact_QK, got_QK), ms_per_query=ms))
        print(out["sweep"][-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,100000", help="comma-separated numbers of stored items")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=200, help="queries per size (at most 50 above 1e5)")
    p.add_argument("--out", default="docs/results/memory/bench.json")
    p.add_argument("--data", choices=("clustered", "gaussian"), default="clustered")
    p.add_argument("--hnsw_max", type=int, default=10**7, help="skip the HNSW index above this many items")
    p.add_argument("--workdir", default=None, help="where the store files go (default: a temporary folder)")
    p.add_argument("--no_append", action="store_true", help="print only; do not write BENCHMARKS.md")
    p.add_argument("--ef_sweep", default="", help="e.g. 128,256,512,1024: only sweep the bare index's ef_search")
    p.add_argument("--connectivity", type=int, default=None, help="--ef_sweep's HNSW M (default: the store's)")
    p.add_argument("--expansion_add", type=int, default=None, help="--ef_sweep's ef_construction (default: store's)")
    p.add_argument(
        "--backends",
        default="sqlite",
        help="comma-separated: sqlite (a file per store) and/or pg (PostgreSQL + pgvector: --pg_dsn's server, else a "
        "throwaway local one)",
    )
    p.add_argument(
        "--sqlite_optimize",
        action="store_true",
        help="run SQLite's PRAGMA optimize (table statistics) after the writes, before the retrievals",
    )
    p.add_argument("--pg_dsn", default=None, help="a PostgreSQL server with pgvector (default: start a local one)")
    p.add_argument("--pg_ef_search", type=int, default=100, help="pgvector's hnsw.ef_search for the pg backend")
    p.add_argument(
        "--pg_settings", default="", help="postgres -c settings of the local server, e.g. synchronous_commit=off"
    )
    args = p.parse_args(argv)
    backends = args.backends.split(",")
    if not backends or set(backends) - {"sqlite", "pg"}:
        raise ValueError(f"--backends = {args.backends!r}; expected a comma-separated subset of sqlite,pg")
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    if args.ef_sweep:
        efs = [int(e) for e in args.ef_sweep.split(",")]
        knobs = dict(connectivity=args.connectivity, expansion_add=args.expansion_add)
        knobs = {k: v for k, v in knobs.items() if v is not None}
        res = [ef_sweep(n, args.dim, args.queries, args.data, efs, **knobs) for n in sizes]
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(dict(results=res, cpu=common.cpu_model()), indent=1))
        return
    monitor = common.ContentionMonitor()
    rows, results = [], []
    with contextlib.ExitStack() as stack:
        dsn = args.pg_dsn
        if "pg" in backends and dsn is None:
            from framework.memory import pg

            settings = dict(kv.split("=", 1) for kv in args.pg_settings.split(",") if kv)
            dsn = stack.enter_context(pg.local_server(settings=settings))
        tmp = stack.enter_context(tempfile.TemporaryDirectory(dir=args.workdir))
        for n in sizes:
            for backend in backends:
                r = bench_size(
                    n,
                    args.dim,
                    args.queries if n <= 100_000 else min(args.queries, 50),
                    tmp,
                    hnsw=n <= args.hnsw_max,
                    data=args.data,
                    dsn=dsn if backend == "pg" else None,
                    ef_search=args.pg_ef_search,
                    sqlite_optimize=args.sqlite_optimize,
                )
                results.append(r)
                rows.append(
                    [
                        r["backend"] + (f" ({r['knn_plan']})" if "knn_plan" in r else ""),
                        f"{n:.0e}",
                        f"{r['write_batched_per_s']:,.0f}",
                        f"{r['write_single_per_s']:,.0f}",
                        f"{r['exact_p50_ms']:.2f} / {r['exact_p99_ms']:.2f}",
                        f"{r['approx_p50_ms']:.2f} / {r['approx_p99_ms']:.2f}",
                        f"{r['recall_at_10']:.3f}",
                        f"{r['hnsw_build_s']:.1f}",
                        f"{r['file_mb']:.0f}",
                    ]
                )
                print(rows[-1], flush=True)
    hnsw = ", ".join(f"{k}={v}" for k, v in memory.ApproxIndex(1).settings.items())
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(dict(results=results, hnsw=hnsw, cpu=common.cpu_model(), cores=common.num_cores()), indent=1)
    )
    table = common.markdown_table(
        [
            "backend",
            "N items",
            "writes/s (1000 per txn)",
            "writes/s (1 per txn)",
            "exact p50 / p99 ms",
            "HNSW p50 / p99 ms",
            "HNSW recall@10",
            "HNSW build s",
            "file MB",
        ],
        rows,
    )
    body = (
        f"`VectorStore` on SQLite (WAL, synchronous=NORMAL) with sqlite-vec exact KNN and a usearch HNSW index at "
        f"the store's defaults ({hnsw}), D={args.dim} {args.data} unit vectors, k=10; latency is the store's whole "
        f"retrieval path (search, SQL visibility filter, use counts)"
        f"{'; SQLite table statistics (PRAGMA optimize) taken after the writes' if args.sqlite_optimize else ''}. "
        f"JSON: `{out}`.\n\n{table}\n"
    )
    if "pg" in backends:
        body += (
            f"\npostgres rows: the same store on `pg.PostgresDB` (one schema; the pgvector HNSW index kept row by row "
            f"on every write, m=16, ef_construction=64, hnsw.ef_search={args.pg_ef_search}, iterative scan), its "
            f"retrieval in the HNSW column, recall@10 against a numpy brute force; server settings: "
            f"{args.pg_settings or 'defaults (fsync, synchronous_commit=on)'}; size = the schema's tables + "
            "indexes; build = a one-pass `rebuild_index()` afterwards.\n"
        )
    import apsw
    import usearch

    entry = common.Entry(
        title="Memory stores: writes, retrieval latency, HNSW recall",
        command=common.command_line("scripts.bench.memory", argv),
        versions={"sqlite": apsw.sqlite_lib_version(), "apsw": apsw.apsw_version(), "usearch": usearch.__version__},
        body=body,
        contention=monitor.note(),
    )
    common.publish(entry, append_to_file=not args.no_append)


if __name__ == "__main__":
    main()
