"""The approximate nearest-neighbour index (usearch HNSW) beside a store's exact sqlite-vec search, and its recall.

Glossary: N vectors, D width, K neighbours, Q queries.

The SQLite file is the source of truth; the HNSW index is a cache of its vectors kept in a sidecar file
(`<db>.usearch` + `<db>.usearch.json` recording the largest item id it holds). On open the sidecar is loaded when it
matches the file and rebuilt from the file's vectors otherwise, and before each search the index takes in any rows
written since (by this or another process), so it never misses a committed item. Hidden items stay in the index and
are filtered out by the store's SQL, like the exact path.

`recall_at_k(exact_QK, approx_QK)` is the fraction of the exact top-K ids that the approximate search also returned.
"""

from __future__ import annotations

import json
import os

import numpy as np
from usearch.index import Index

__all__ = ["ApproxIndex", "recall_at_k"]


def recall_at_k(exact_QK: np.ndarray, approx_QK: np.ndarray) -> float:
    """Mean over queries of |exact top-K ∩ approximate top-K| / K."""
    exact_QK, approx_QK = np.asarray(exact_QK), np.asarray(approx_QK)
    if exact_QK.shape != approx_QK.shape or exact_QK.ndim != 2:
        raise ValueError(f"exact {exact_QK.shape} and approx {approx_QK.shape}: expected two [Q, K] id arrays")
    hits = [len(set(e.tolist()) & set(a.tolist())) for e, a in zip(exact_QK, approx_QK)]
    return float(np.mean(hits) / exact_QK.shape[1])


class ApproxIndex:
    """A cosine HNSW index over (item id, vector) pairs; `connectivity` is HNSW's M, the expansions its ef.

    The default ef_search (1024) is set for recall@10 >= 0.95 at 1e5 items on unstructured (isotropic Gaussian)
    vectors, the hard case; clustered vectors, like real embeddings, reach it with far less (scripts/bench/memory.py
    measures both). A search costs about ef_search distance evaluations per layer-0 step, so it stays well below the
    exact scan's N at large N, and a small store is searched almost exhaustively.
    """

    def __init__(self, dim: int, *, connectivity: int = 16, expansion_add: int = 64, expansion_search: int = 1024):
        for name, v in (
            ("dim", dim),
            ("connectivity", connectivity),
            ("expansion_add", expansion_add),
            ("expansion_search", expansion_search),
        ):
            if int(v) <= 0:
                raise ValueError(f"{name} = {v}; expected a positive integer")
        self.dim = int(dim)
        self.settings = dict(
            connectivity=int(connectivity), expansion_add=int(expansion_add), expansion_search=int(expansion_search)
        )
        self.index = Index(ndim=self.dim, metric="cos", dtype="f32", **self.settings)
        self.max_id = 0

    def __len__(self) -> int:
        return len(self.index)

    def add(self, ids_N, x_ND: np.ndarray) -> None:
        """Adds vectors under their item ids."""
        ids_N = np.asarray(ids_N, np.uint64)
        if len(ids_N):
            self.index.add(ids_N, np.ascontiguousarray(x_ND, np.float32))
            self.max_id = max(self.max_id, int(ids_N.max()))

    def search(self, q_D: np.ndarray, k: int) -> list[tuple[int, float]]:
        """About the k nearest items: [(item_id, cosine distance)], nearest first."""
        if int(k) <= 0:
            raise ValueError(f"k = {k}; expected a positive number of neighbours")
        if not len(self.index):
            return []
        m = self.index.search(np.asarray(q_D, np.float32), int(k))
        return [(int(i), float(d)) for i, d in zip(m.keys, m.distances)]

    def search_batch(self, q_QD: np.ndarray, k: int) -> np.ndarray:
        """[Q, k] ids of about the k nearest items of each query."""
        m = self.index.search(np.ascontiguousarray(q_QD, np.float32), int(k))
        return np.asarray(m.keys).reshape(len(q_QD), -1)[:, :k].astype(np.int64)

    def save(self, path: str) -> None:
        """Writes the index and its record (largest item id) next to the store's file."""
        self.index.save(path)
        with open(path + ".json.tmp", "w") as f:
            json.dump({"max_id": self.max_id, "count": len(self.index), "dim": self.dim, **self.settings}, f)
        os.replace(path + ".json.tmp", path + ".json")

    @classmethod
    def load(cls, path: str, dim: int, **settings) -> ApproxIndex | None:
        """The saved index at `path`, or None when there is none or it was built with other settings."""
        try:
            with open(path + ".json") as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return None
        out = cls(dim, **settings)
        if rec.get("dim") != out.dim or any(rec.get(k) != v for k, v in out.settings.items()):
            return None
        try:
            out.index.load(path)
        except Exception:  # a damaged sidecar is only a cache: the caller rebuilds it from the database
            return None
        if len(out.index) != rec.get("count"):
            return None
        out.max_id = int(rec["max_id"])
        return out
