"""What the model gets wrong and what is wrong with the data, computed on arrays.

Everything here works on cached features and on out-of-fold class probabilities from
:mod:`retrain.crossfit` (every image scored by a layer that never saw it); nothing runs the
backbone again. The functions take plain arrays and return plain results, so the training run,
the benchmarks and the tests call the same code:

- :func:`wilson_interval`, :func:`classification_metrics`: accuracy, per-class precision,
  recall and F1 with 95% intervals, and the confusion matrix;
- :func:`rank_label_issues`: images whose given label the held-out layers disbelieve, most
  likely wrong first;
- :func:`find_duplicates`: exact copies (same content key) and near copies (feature cosine
  similarity above a measured threshold);
- :func:`learning_curve`, :func:`fit_saturating`: accuracy against the number of training
  images, and what twice as many photos would give.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from retrain.crossfit import fit_and_score_many

Z95 = 1.959963984540054  # two-sided 95% normal quantile

# Near copies: centred cosine similarity of the bottleneck features at least NEAR_DUPLICATE_FLOOR, and the
# pair's distance (1 - similarity) at most NEAR_DUPLICATE_RATIO times that of the 5th-nearest other image
# of either photo (of whichever has the closer one): a copy is much closer than the set's ordinary
# neighbours, which a fixed cut cannot say for folders of alike pictures (textures, digits, telescope
# images: distinct photos there are as similar as copies elsewhere). Rows with fewer than 5 other images
# use NEAR_DUPLICATE_SMALL_SET alone. Measured in docs/report.md (six real folders, injected copies).
NEAR_DUPLICATE_FLOOR = 0.70
NEAR_DUPLICATE_RATIO = 0.30
NEAR_DUPLICATE_REFERENCE = 5  # the neighbour whose distance is the yardstick
NEAR_DUPLICATE_SMALL_SET = 0.90
NEAR_DUPLICATE_RULE = (
    f"feature similarity ≥ {NEAR_DUPLICATE_FLOOR:.2f}, and under {NEAR_DUPLICATE_RATIO:g}× the distance "
    f"from either photo to its {NEAR_DUPLICATE_REFERENCE}th-nearest image"
)

# Label issues blend the out-of-fold score with the labels of this many nearest images (docs/report.md:
# +4 points of top-k recall on average over five real sets, +0 on top-2k).
LABEL_NEIGHBOURS = 10

# Above this many rows the similarity pass compares each row only with the rows of nearby cells: exact,
# the pass costs ~N^2 D flops (30,000 photos: about 20 s here, 100,000: 4 min, a million: 7 h), the cell pass
# ~N^1.5 D PROBE_CELLS. Its recall against the exact pass is measured in docs/report.md.
EXACT_MAX = 30_000
PROBE_CELLS = 8  # cells searched per cell: its own and the nearest others, by centroid
KMEANS_ROUNDS = 6
CELL_BLOCK_ENTRIES = 1 << 24

LEARNING_CURVE_FRACTIONS = (0.1, 0.2, 0.35, 0.5, 0.7, 1.0)
LEARNING_CURVE_SEEDS = 2
# Per fit: 70 steps of 40 images. On six real sets the curve fitted on <=50% predicts the 100% point
# within 1.75 points on average (2.3 with 100 steps of 100, 1.8 with 100 of 50), at a third of the cost
# (docs/report.md).
LEARNING_CURVE_STEPS = 70
LEARNING_CURVE_BATCH = 40


# -- accuracy with its uncertainty ------------------------------------------------------------------
def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials; (0, 1) when ``n`` is 0.

    Unlike the normal approximation it stays inside [0, 1] and is honest at 0% and 100%.
    """
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_line(k: int, n: int) -> str:
    """``95.2% (N=21, 95% CI 77.3-99.2%)``: an accuracy with its count and interval."""
    lo, hi = wilson_interval(k, n)
    return f"{100 * k / n:.1f}% (N={n}, 95% CI {100 * lo:.1f}-{100 * hi:.1f}%)"


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> dict:
    """Accuracy, per-class precision / recall / F1 with support and Wilson intervals, confusion matrix.

    ``confusion[i][j]`` counts images of true class i predicted as j. A precision or recall with
    nothing to count is None (not 0: the class was never predicted, or has no images here).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    c = len(labels)
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    n, correct = int(len(y_true)), int(np.trace(confusion))
    per_class = []
    for i, label in enumerate(labels):
        tp, support, predicted = int(confusion[i, i]), int(confusion[i].sum()), int(confusion[:, i].sum())
        precision = tp / predicted if predicted else None
        recall = tp / support if support else None
        f1 = (
            2 * precision * recall / (precision + recall)
            if precision is not None and recall is not None and precision + recall > 0
            else (0.0 if precision is not None and recall is not None else None)
        )
        per_class.append(
            {
                "label": label,
                "support": support,
                "predicted": predicted,
                "correct": tp,
                "precision": precision,
                "precision_ci": list(wilson_interval(tp, predicted)) if predicted else None,
                "recall": recall,
                "recall_ci": list(wilson_interval(tp, support)) if support else None,
                "f1": f1,
            }
        )
    return {
        "accuracy": correct / n if n else None,
        "count": n,
        "correct": correct,
        "accuracy_ci": list(wilson_interval(correct, n)) if n else None,
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


# -- label errors -----------------------------------------------------------------------------------
@dataclass
class LabelIssues:
    """Per row: ``score`` in [0, 1] (higher = more likely mislabelled), ``suggested`` class index
    (the most probable class other than the given one), and ``order``: rows most likely wrong first."""

    score: np.ndarray
    suggested: np.ndarray
    order: np.ndarray


def rank_label_issues(
    proba: np.ndarray,
    y: np.ndarray,
    *,
    X: np.ndarray | None = None,
    groups: Sequence | None = None,
    neighbours: int = 0,
    neighbour_weight: float = 0.5,
    nearest: Nearest | None = None,
) -> LabelIssues:
    """Rank rows by how little the held-out layers believe their given label.

    ``proba`` (N, C) must come from layers that never saw the row (out-of-fold). The score is
    ``1 - proba[y]`` (cleanlab's "self-confidence"). With ``neighbours`` k > 0 and features ``X``
    (or their :func:`nearest_neighbours` already computed, ``nearest``), it is blended with the share
    of the k nearest other images (cosine, outside the row's own ``groups``) that carry another
    label; docs/report.md measures whether that helps.
    """
    proba, y = np.asarray(proba, dtype=np.float64), np.asarray(y)
    n = len(y)
    rows = np.arange(n)
    score = 1.0 - proba[rows, y]
    others = proba.copy()
    others[rows, y] = -1.0
    suggested = others.argmax(axis=1)
    if nearest is None and neighbours > 0 and X is not None and n > 1:
        nearest = nearest_neighbours(X, neighbours, groups=groups)
    if nearest is not None and nearest.index.shape[1] > 0:
        disagree, votes = _neighbour_votes(nearest, y, proba.shape[1], neighbours or nearest.index.shape[1])
        score = (1 - neighbour_weight) * score + neighbour_weight * disagree
        blended = (1 - neighbour_weight) * others + neighbour_weight * votes
        blended[rows, y] = -1.0
        suggested = blended.argmax(axis=1)
    # Ties (e.g. many rows at score 0) keep a stable, reproducible order.
    order = np.lexsort((rows, -score))
    return LabelIssues(score=score, suggested=suggested, order=order)


def _neighbour_votes(nearest: Nearest, y: np.ndarray, n_classes: int, k: int):
    """Share of each row's k nearest neighbours that disagree with its label, and their label shares
    (N, C). Rows with fewer than k neighbours (tiny sets, many copies) vote over those they have."""
    index, valid = nearest.index[:, :k], nearest.valid[:, :k]
    n = len(y)
    count = np.maximum(valid.sum(axis=1), 1)
    labels = y[np.where(valid, index, 0)]
    disagree = ((labels != y[:, None]) & valid).sum(axis=1) / count
    rows = np.broadcast_to(np.arange(n)[:, None], index.shape)
    votes = np.bincount(
        (rows * n_classes + labels)[valid],
        weights=np.broadcast_to(1.0 / count[:, None], index.shape)[valid],
        minlength=n * n_classes,
    ).reshape(n, n_classes)
    return disagree, votes


# -- one pass over the similarity matrix: nearest neighbours and near copies -------------------------
@dataclass
class Nearest:
    """Each row's ``k`` most similar other rows, most similar first: ``index`` (N, k) and centred cosine
    ``similarity`` (N, k), -inf (index 0) where a row has fewer than k others outside its group. ``pairs``:
    the pairs (i < j, similarity) at or above the ``threshold`` the pass was asked for. ``exact``: every row
    was compared with every other (False: only with those of nearby cells, :func:`_cell_pass`)."""

    index: np.ndarray
    similarity: np.ndarray
    pair_i: np.ndarray
    pair_j: np.ndarray
    pair_similarity: np.ndarray
    exact: bool = True

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.similarity)


def nearest_neighbours(
    X: np.ndarray,
    k: int,
    *,
    groups: Sequence | None = None,
    threshold: float | None = None,
    block: int = 1024,
    exact_max: int | None = None,
) -> Nearest:
    """The ``k`` nearest other rows of every row (centred cosine), rows of one group excluded, and, with
    ``threshold``, every pair at or above it: one pass over the similarity matrix for both.

    The matrix is computed in row blocks of ``block`` (memory O(block x N)), in float32. The top k of a
    block is found without sorting whole rows: the k-th best similarity among the first few thousand
    columns bounds the row's k-th best from below, and only columns at or above it are ranked.
    Above ``exact_max`` rows (default EXACT_MAX) the whole matrix would take hours (it grows as N^2):
    the search is restricted to cells of similar rows instead (:func:`_cell_pass`).
    """
    n = len(X)
    gid = _group_array(groups, n)
    first = np.unique(gid, return_index=True)[1]
    Z = _unit_rows(X, centre=True, rows=first)  # copies do not pull the mean
    k = max(0, min(k, n - 1))
    if n > (EXACT_MAX if exact_max is None else exact_max):
        return _cell_pass(Z, gid, k, threshold, seed=0)
    kk = min(max(k, 8), n - 1) if threshold is not None else k  # neighbours looked at per row
    has_copy = np.bincount(gid)[gid] > 1
    index = np.zeros((n, k), dtype=np.int64)
    similarity = np.full((n, k), -np.inf, dtype=np.float32)
    pi: list[np.ndarray] = []
    pj: list[np.ndarray] = []
    ps: list[np.ndarray] = []
    # Below a few thousand rows one BLAS thread is faster: waking a second costs more than it saves.
    with threadpool_limits(1 if n < 4096 else None, user_api="blas"):
        for start in range(0, n, block):
            stop = min(start + block, n)
            local = np.arange(stop - start)
            S = Z[start:stop] @ Z.T  # (B, N)
            S[local, start + local] = -np.inf  # not its own neighbour
            shared = np.flatnonzero(has_copy[start:stop])
            if len(shared):  # nor are its copies
                S[shared] = np.where(gid[start + shared, None] == gid[None, :], -np.inf, S[shared])
            if not kk:
                continue
            idx, sim = _top_k(S, kk)
            index[start:stop], similarity[start:stop] = idx[:, :k], sim[:, :k]
            if threshold is not None:
                # A row's pairs above the threshold are among its kk nearest unless even the kk-th is above
                # it: only those rows are scanned whole.
                full = sim[:, -1] >= threshold
                a, m = np.nonzero((sim >= threshold) & ~full[:, None])
                a, b, v = a, idx[a, m], sim[a, m]
                if full.any():
                    fa, fb = np.nonzero(S[full] >= threshold)
                    fa = np.flatnonzero(full)[fa]
                    a, b, v = np.concatenate([a, fa]), np.concatenate([b, fb]), np.concatenate([v, S[fa, fb]])
                upper = b > start + a
                pi.append(start + a[upper])
                pj.append(b[upper])
                ps.append(v[upper])
    cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
    index[~np.isfinite(similarity)] = 0
    return Nearest(
        index=index,
        similarity=similarity,
        pair_i=cat(pi, np.int64),
        pair_j=cat(pj, np.int64),
        pair_similarity=cat(ps, np.float32),
    )


def _cell_pass(Z: np.ndarray, gid: np.ndarray, k: int, threshold: float | None, *, seed: int) -> Nearest:
    """:func:`nearest_neighbours` over unit rows ``Z`` (N, D) restricted to cells: rows are put in about
    sqrt(N) cells by a few rounds of spherical k-means (on a sample), and each cell's rows are compared
    with the rows of its PROBE_CELLS nearest cells. Pairs found from both sides are reported once."""
    n = len(Z)
    members, near_cells = _cells(Z, seed)
    index = np.zeros((n, k), dtype=np.int64)
    similarity = np.full((n, k), -np.inf, dtype=np.float32)
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for c in range(len(members)):
        cand = np.concatenate([members[o] for o in near_cells[c]])
        # Row blocks bound the product's memory (~16 M entries) when a cell is large (alike photos).
        step = max(1, CELL_BLOCK_ENTRIES // max(len(cand), 1))
        for start in range(0, len(members[c]), step):
            rows = members[c][start : start + step]
            S = Z[rows] @ Z[cand].T  # (R, M)
            S[gid[rows][:, None] == gid[cand][None, :]] = -np.inf  # itself and its copies
            if k:
                kk = min(k, len(cand))
                idx, sim = _top_k(S, kk)
                index[rows, :kk], similarity[rows, :kk] = cand[idx], sim
            if threshold is not None:
                a, b = np.nonzero(S >= threshold)
                i, j = rows[a], cand[b]
                pairs.append((np.minimum(i, j), np.maximum(i, j), S[a, b]))
    pi, pj, ps = (
        (np.concatenate(p) for p in zip(*pairs))
        if pairs
        else (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.float32),)
    )
    _, once = np.unique(pi * n + pj, return_index=True)  # a pair seen from both of its cells
    pi, pj, ps = pi[once], pj[once], ps[once].astype(np.float32)
    if k:  # a pair found only from j's cell is also one of i's neighbours
        index, similarity = _merge_neighbours(index, similarity, np.r_[pi, pj], np.r_[pj, pi], np.r_[ps, ps])
    index[~np.isfinite(similarity)] = 0
    return Nearest(index, similarity, pi, pj, ps, exact=False)


def _cells(Z: np.ndarray, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """About sqrt(N) cells of similar rows: each cell's rows, and the PROBE_CELLS cells it searches."""
    cells = max(1, math.isqrt(len(Z)))
    centroids = _spherical_kmeans(Z, cells, seed)
    cell = _nearest_centroid(Z, centroids)
    order = np.argsort(cell, kind="stable")
    members = np.split(order, np.searchsorted(cell[order], np.arange(1, cells)))
    # Many identical photos give identical centroids: a cell searches itself first, and never empty cells.
    closeness = centroids @ centroids.T
    closeness[:, [not len(m) for m in members]] = -np.inf
    np.fill_diagonal(closeness, np.inf)
    return members, np.argsort(-closeness, axis=1)[:, : min(PROBE_CELLS, cells)]


def _merge_neighbours(index, similarity, rows, cols, sims) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best of its neighbour list and the extra (row, col, similarity) entries, best first."""
    n, k = index.shape
    valid = np.isfinite(similarity)
    r = np.concatenate([np.nonzero(valid)[0], rows])
    c = np.concatenate([index[valid], cols])
    v = np.concatenate([similarity[valid], sims]).astype(np.float32)
    _, once = np.unique(r * n + c, return_index=True)
    r, c, v = r[once], c[once], v[once]
    order = np.lexsort((-v, r))
    r, c, v = r[order], c[order], v[order]
    rank = np.arange(len(r)) - np.searchsorted(r, r)
    keep = rank < k
    index = np.zeros((n, k), dtype=np.int64)
    similarity = np.full((n, k), -np.inf, dtype=np.float32)
    index[r[keep], rank[keep]], similarity[r[keep], rank[keep]] = c[keep], v[keep]
    return index, similarity


def _spherical_kmeans(Z: np.ndarray, cells: int, seed: int) -> np.ndarray:
    """``cells`` unit centroids (cells, D) from KMEANS_ROUNDS rounds of k-means on cosine, on a sample
    of at most 40 rows a cell (enough to place a centroid; the full data would cost N x cells x D a round)."""
    rng = np.random.default_rng(seed)
    sample = Z[rng.choice(len(Z), size=min(len(Z), 40 * cells), replace=False)]
    centroids = sample[rng.choice(len(sample), size=cells, replace=False)].copy()
    for _ in range(KMEANS_ROUNDS):
        which = _nearest_centroid(sample, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, which, sample)
        empty = ~np.bincount(which, minlength=cells).astype(bool)
        restart = rng.choice(len(sample), size=int(empty.sum()), replace=int(empty.sum()) > len(sample))
        sums[empty] = sample[restart]  # an empty cell starts again from a random row
        centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return centroids


def _nearest_centroid(Z: np.ndarray, centroids: np.ndarray, block: int = 8192) -> np.ndarray:
    return np.concatenate(
        [(Z[s : s + block] @ centroids.T).argmax(axis=1) for s in range(0, len(Z), block)]
    ).astype(np.int64)


def _top_k(S: np.ndarray, k: int, probe: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of the k largest entries of each row of ``S`` (B, N), largest first."""
    b, n = S.shape
    if n <= probe:
        idx = np.argpartition(S, n - k, axis=1)[:, n - k :]
    else:
        # The k-th largest among the first ``probe`` columns is a lower bound of the row's k-th largest:
        # every entry of the row's top k is at or above it, and few others are.
        bound = np.partition(S[:, :probe], probe - k, axis=1)[:, probe - k]
        rr, cc = np.nonzero(S >= bound[:, None])
        vals = S[rr, cc]
        order = np.lexsort((-vals, rr))
        rr, cc = rr[order], cc[order]
        first = np.searchsorted(rr, np.arange(b))
        rank = np.arange(len(rr)) - first[rr]
        keep = rank < k
        idx = np.empty((b, k), dtype=np.int64)
        idx[rr[keep], rank[keep]] = cc[keep]
    vals = np.take_along_axis(S, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(vals, order, axis=1)


# -- duplicates -------------------------------------------------------------------------------------
@dataclass
class DuplicatePairs:
    """Pairs of row indices (i < j) with ``kind`` "exact" or "near" and cosine ``similarity``."""

    i: np.ndarray
    j: np.ndarray
    kind: np.ndarray
    similarity: np.ndarray

    def __len__(self) -> int:
        return len(self.i)


def find_duplicates(
    X: np.ndarray,
    keys: Sequence[bytes],
    *,
    threshold: float = NEAR_DUPLICATE_FLOOR,
    ratio: float | None = NEAR_DUPLICATE_RATIO,
    block: int = 1024,
    nearest: Nearest | None = None,
) -> DuplicatePairs:
    """Exact copies (identical content key) and near copies (see NEAR_DUPLICATE_FLOOR above).

    A near pair has centred cosine similarity >= ``threshold`` and, unless ``ratio`` is None, a
    distance ``1 - similarity`` at most ``ratio`` times the distance of the closer of the two photos'
    5th-nearest other images (pairs of photos with fewer than 5 others need NEAR_DUPLICATE_SMALL_SET).
    Exact copies of one file are reported once per pair of paths. For near copies, each set of
    exact copies is represented by its first row, so one photo copied five times does not turn a
    near pair into 25. ``nearest``: a :func:`nearest_neighbours` pass over the same rows with
    ``groups=keys``, at least 5 neighbours and a threshold at or below this one, whose pairs are reused.
    """
    n = len(keys)
    first_of: dict[bytes, int] = {}
    rep = np.empty(n, dtype=np.int64)
    pi: list[int] = []
    pj: list[int] = []
    for row, key in enumerate(keys):
        rep[row] = first_of.setdefault(key, row)
    for key_rows in _rows_by_key(keys).values():
        for a in range(len(key_rows)):
            for b in range(a + 1, len(key_rows)):
                pi.append(key_rows[a])
                pj.append(key_rows[b])
    if nearest is None:
        reference = NEAR_DUPLICATE_REFERENCE if ratio is not None else 0
        nearest = nearest_neighbours(X, reference, groups=list(keys), threshold=threshold, block=block)
    ni, nj, ns = nearest.pair_i, nearest.pair_j, nearest.pair_similarity.astype(np.float64)
    near = (ns >= threshold) & (rep[ni] == ni) & (rep[nj] == nj)
    if ratio is not None:
        near &= _closer_than_neighbours(nearest, ni, nj, ns, ratio)
    ni, nj, ns = ni[near], nj[near], ns[near]
    i = np.concatenate([np.array(pi, dtype=np.int64), ni])
    j = np.concatenate([np.array(pj, dtype=np.int64), nj])
    sims = np.concatenate([np.ones(len(pi)), ns])
    kind = np.array(["exact"] * len(pi) + ["near"] * len(ni), dtype="<U5")
    order = np.lexsort((j, i, -sims))
    return DuplicatePairs(i=i[order], j=j[order], kind=kind[order], similarity=sims[order])


def _closer_than_neighbours(nearest: Nearest, i, j, sim, ratio: float) -> np.ndarray:
    """Pairs whose distance is at most ``ratio`` x the reference neighbour's distance (the closer of the two)."""
    col = NEAR_DUPLICATE_REFERENCE - 1
    if nearest.similarity.shape[1] > col:
        ref = np.maximum(nearest.similarity[i, col], nearest.similarity[j, col]).astype(np.float64)
    else:
        ref = np.full(len(i), -np.inf)
    known = np.isfinite(ref)
    out = sim >= NEAR_DUPLICATE_SMALL_SET  # too few other images for a yardstick
    out[known] = (1 - sim[known]) <= ratio * (1 - ref[known])
    return out


def _rows_by_key(keys: Sequence[bytes]) -> dict[bytes, list[int]]:
    rows: dict[bytes, list[int]] = {}
    for row, key in enumerate(keys):
        rows.setdefault(key, []).append(row)
    return {k: v for k, v in rows.items() if len(v) > 1}


def _unit_rows(X: np.ndarray, *, centre: bool, rows: np.ndarray | None = None) -> np.ndarray:
    """Rows scaled to unit length, after removing the mean row (of ``rows``, default all): what every
    photo shares (the backbone's average response) otherwise makes unrelated photos look alike."""
    Z = np.asarray(X, dtype=np.float32)
    if centre:
        Z = Z - (Z if rows is None else Z[rows]).mean(axis=0, keepdims=True)
    norms = np.linalg.norm(Z, axis=1, keepdims=True)
    return Z / np.maximum(norms, 1e-12)


def _group_array(groups: Sequence | None, n: int) -> np.ndarray:
    if groups is None:
        return np.arange(n)
    index: dict = {}
    return np.array([index.setdefault(g, len(index)) for g in groups], dtype=np.int64)


# -- learning curve ---------------------------------------------------------------------------------
@dataclass
class LearningCurve:
    """Accuracy when the layer is fitted on nested subsets of the training rows.

    ``sizes`` (F,) mean number of training images at each fraction; ``accuracy`` (S, F) per seed;
    ``per_class`` (S, F, C) recall of each class on the held-out rows (NaN where a class has none).
    """

    fractions: np.ndarray
    sizes: np.ndarray
    accuracy: np.ndarray
    per_class: np.ndarray
    seconds: float


def learning_curve(
    X: np.ndarray,
    y: np.ndarray,
    fold: np.ndarray,
    *,
    n_classes: int,
    head_params: dict,
    fractions: Sequence[float] = LEARNING_CURVE_FRACTIONS,
    seeds: int = LEARNING_CURVE_SEEDS,
    steps: int = LEARNING_CURVE_STEPS,
    batch_size: int = LEARNING_CURVE_BATCH,
    seed: int = 0,
    solved_c: float | None = None,
) -> LearningCurve:
    """Fit the layer on nested 10% ... 100% subsets of all rows outside one fold, score that fold.

    Seed s holds out fold ``s mod K`` of the cross-fit ``fold`` assignment (so groups of copies
    stay on one side) and draws one nested order per class: every subset keeps each class's
    share and holds at least one image of it. Fits are short (``steps``) and run batched, or, with
    ``solved_c`` (the run's layer is the L-BFGS one at that scikit-learn C), each subset's layer is solved
    at that C, warm-started from the next smaller subset's.
    """
    import time

    t0 = time.perf_counter()
    y = np.asarray(y)
    folds = np.unique(fold)
    params = {
        **head_params,
        "steps": min(steps, head_params.get("steps", steps)),
        "batch_size": min(batch_size, head_params.get("batch_size", batch_size)),
    }
    jobs = []
    for s in range(seeds):
        held = folds[s % len(folds)]
        pool = np.flatnonzero(fold != held)
        score_idx = np.flatnonzero(fold == held)
        rng = np.random.default_rng(seed + 7919 * (s + 1))
        per_class = [rng.permutation(pool[y[pool] == c]) for c in range(n_classes)]
        for f_i, frac in enumerate(fractions):
            train_idx = np.concatenate(
                [rows[: max(1, math.ceil(frac * len(rows)))] for rows in per_class if len(rows)]
            )
            jobs.append((s, f_i, train_idx, score_idx, seed + 31 * s + f_i))

    if solved_c is not None:
        scored = _solved_curve(
            X, y, jobs, seeds, n_classes, solved_c, head_params.get("class_balance") == "weight"
        )
    else:
        # All fits in one batched loop: M small layers cost little more than one (crossfit.fit_and_score_many).
        # Only the end of each fit is scored.
        _, stepped = fit_and_score_many(
            X,
            y,
            [(t, sc, fit_seed) for _, _, t, sc, fit_seed in jobs],
            n_classes=n_classes,
            head_params=params,
            score_at=[params["steps"]],
        )
        scored = [logits[-1] for logits in stepped]
    acc = np.full((seeds, len(fractions)), np.nan)
    per = np.full((seeds, len(fractions), n_classes), np.nan)
    sizes = np.zeros((seeds, len(fractions)))
    for (s, f_i, train_idx, score_idx, _), logits in zip(jobs, scored):
        truth = y[score_idx]
        hit = logits.argmax(axis=1) == truth
        acc[s, f_i] = hit.mean() if len(hit) else np.nan
        sizes[s, f_i] = len(train_idx)
        for c in np.unique(truth):
            per[s, f_i, c] = hit[truth == c].mean()
    return LearningCurve(
        fractions=np.asarray(fractions, dtype=np.float64),
        sizes=sizes.mean(axis=0),
        accuracy=acc,
        per_class=per,
        seconds=time.perf_counter() - t0,
    )


def _solved_curve(X, y, jobs, seeds: int, n_classes: int, c: float, balanced: bool) -> list[np.ndarray]:
    """The learning curve's logits per job (in ``jobs``' order) from L-BFGS layers: one chain of nested
    subsets per seed, each solve warm-starting from the smaller subset's solution (which never saw the
    scored fold either)."""
    from retrain.crossfit import solve_and_score_chains

    chains = [[(t, sc) for s_j, _, t, sc, _ in jobs if s_j == s] for s in range(seeds)]
    solved = solve_and_score_chains(X, y, chains, n_classes=n_classes, c=c, balanced=balanced)
    return [logits for chain in solved for logits in chain]


@dataclass
class SaturatingFit:
    """``accuracy(n) = ceiling - scale * n ** -rate``: rises with more images and levels off."""

    ceiling: float
    scale: float
    rate: float

    def __call__(self, n) -> np.ndarray:
        return np.clip(
            self.ceiling - self.scale * np.power(np.asarray(n, dtype=np.float64), -self.rate), 0, 1
        )


def fit_saturating(sizes: np.ndarray, accuracy: np.ndarray) -> SaturatingFit | None:
    """Least-squares fit of ``ceiling - scale * n^-rate`` (rate on a grid, the rest linear).

    Returns None with fewer than 3 distinct sizes. The ceiling is kept at or below 1 and the
    scale at or above 0, so the curve never predicts falling accuracy with more data.
    """
    sizes, accuracy = np.asarray(sizes, np.float64), np.asarray(accuracy, np.float64)
    ok = np.isfinite(accuracy) & (sizes > 0)
    sizes, accuracy = sizes[ok], accuracy[ok]
    if len(np.unique(sizes)) < 3:
        return None
    rates = np.linspace(0.05, 2.0, 40)
    basis = np.power(sizes[None, :], -rates[:, None])  # (R, N): every rate of the grid at once
    # Ordinary least squares of accuracy = ceiling - scale * basis, per rate (two unknowns: closed form).
    b_mean, a_mean = basis.mean(axis=1), accuracy.mean()
    slope = ((basis - b_mean[:, None]) * (accuracy - a_mean)).sum(axis=1) / (
        (basis - b_mean[:, None]) ** 2
    ).sum(axis=1)
    scale = np.maximum(-slope, 0.0)
    ceiling = np.minimum(a_mean - slope * b_mean, 1.0)
    err = ((ceiling[:, None] - scale[:, None] * basis - accuracy) ** 2).sum(axis=1)
    best = int(np.argmin(err))  # the first of equals, as a loop over the grid would keep
    return SaturatingFit(float(ceiling[best]), float(scale[best]), float(rates[best]))
