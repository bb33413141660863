"""Splitting one dataset into sites: IID, Dirichlet label skew, or a natural column.

Every partitioner returns one sorted index array per site; together they are disjoint and cover
every record (except `by_column` with fewer sites than groups, which keeps the largest groups).
Results depend only on the inputs and the seed.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence

import numpy as np


class PartitionError(ValueError):
    pass


def iid(num_records: int, num_sites: int, seed: int = 0) -> list[np.ndarray]:
    if num_sites > num_records:
        raise PartitionError(f"{num_sites} sites but only {num_records} records")
    perm = np.random.default_rng(seed).permutation(num_records)
    return [np.sort(part) for part in np.array_split(perm, num_sites)]


def iid_groups(groups: Sequence, num_sites: int, seed: int = 0) -> list[np.ndarray]:
    """IID over groups (persons): each group's records all go to one site, the groups shuffled
    and dealt out so that sites get about equally many records."""
    keys = [str(g) for g in groups]
    members: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    if num_sites > len(members):
        raise PartitionError(f"{num_sites} sites but only {len(members)} persons")
    order = np.random.default_rng(seed).permutation(len(members))
    names = list(members)
    parts: list[list[int]] = [[] for _ in range(num_sites)]
    heap = [(0, s) for s in range(num_sites)]  # (records so far, site)
    for j in order:  # the next person to the site with the fewest records so far
        size, site = heapq.heappop(heap)
        parts[site].extend(members[names[j]])
        heapq.heappush(heap, (size + len(members[names[j]]), site))
    return [np.sort(np.asarray(p, dtype=int)) for p in parts]


def dirichlet(
    labels: Sequence, num_sites: int, alpha: float, seed: int = 0, min_records: int = 2,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label skew (Hsu et al., 2019): each class is split over sites by proportions ~ Dir(alpha)."""
    labels = np.asarray([str(x) for x in labels])
    if num_sites * min_records > len(labels):
        raise PartitionError(f"{len(labels)} records cannot give {num_sites} sites "
                             f">= {min_records} records each")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            props = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_records:
            return [np.sort(np.asarray(p, dtype=int)) for p in parts]
    raise PartitionError(
        f"Dirichlet(alpha={alpha}) left a site with < {min_records} records after {max_tries} "
        "draws; raise data.dirichlet_alpha or lower federation.num_sites"
    )


def by_column(values: Sequence, num_sites: int) -> tuple[list[np.ndarray], list[str]]:
    """One site per distinct value (largest groups first). Returns (parts, group names)."""
    values = [str(v) for v in values]
    counts = Counter(values)
    if num_sites > len(counts):
        raise PartitionError(
            f"the column has {len(counts)} distinct values but federation.num_sites = "
            f"{num_sites}; set num_sites <= {len(counts)}"
        )
    groups = sorted(counts, key=lambda g: (-counts[g], g))[:num_sites]
    arr = np.asarray(values)
    return [np.flatnonzero(arr == g) for g in groups], groups
