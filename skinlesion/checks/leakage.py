"""The leakage-free split: lesion groups joined by verified duplicates, assigned to splits per class.

1. Union-find joins the ``lesion_id`` groups, then the verified near-duplicate pairs of
   :mod:`skinlesion.checks.duplicates` (strongest first). A merge that would exceed
   ``split.max_group_size`` images, or join two diagnoses (a proven false positive), is refused,
   listed in ``duplicates.csv`` and counted (:func:`build_groups`).
2. Groups go to splits per class (seeded: see :func:`assign_splits`), so every class is in every
   split with near-whole proportions (:func:`split_dataset`, which also applies the options
   that drop images and computes the split's metrics).
3. :func:`leakage`, an independent check on the files as written, counts any group, lesion or
   joined duplicate pair that straddles two splits; the split stage fails on any.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from skinlesion.checks.duplicates import Features
from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES
from skinlesion.core.splits import DROPPED, EVAL_SPLITS, SPLITS
from skinlesion.params.split import FractionsParams, SplitParams

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- grouping


class UnionFind:
    """Disjoint sets of rows with their size and diagnosis (-1 once a set mixes two)."""

    def __init__(self, dx_codes: np.ndarray):
        self.parent = np.arange(len(dx_codes))
        self.size = np.ones(len(dx_codes), dtype=np.int64)
        self.dx = np.asarray(dx_codes, dtype=np.int64).copy()

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, a: int, b: int, max_size: int | None = None) -> str:
        """Join the sets of ``a`` and ``b``: "" when joined (or already one), else the refusal.

        Without ``max_size`` (lesion_id groups) the join is unconditional; with it (duplicate
        pairs) it is refused as "size" past the bound or "diagnosis" across two diagnoses."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ""
        if max_size is not None:
            if self.dx[ra] != self.dx[rb] or self.dx[ra] < 0:
                return "diagnosis"
            if self.size[ra] + self.size[rb] > max_size:
                return "size"
        if ra > rb:  # the smaller row is the root: the result does not depend on merge order
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        if self.dx[ra] != self.dx[rb]:
            self.dx[ra] = -1
        return ""


def build_groups(
    lesions: np.ndarray,
    dx: np.ndarray,
    pairs: np.ndarray,
    scores: np.ndarray,
    max_group_size: int,
) -> tuple[np.ndarray, list[str]]:
    """Union-find over lesion_id, then over ``pairs`` strongest first.

    Returns (root row of each row, refusal per pair: "" joined, "size" or "diagnosis")."""
    dx_codes = pd.factorize(dx, sort=True)[0]
    uf = UnionFind(dx_codes)
    les_codes = pd.factorize(lesions)[0]
    first = np.full(les_codes.max() + 1 if len(les_codes) else 0, -1)
    for i, c in enumerate(les_codes):
        if first[c] < 0:
            first[c] = i
        else:
            uf.union(int(first[c]), i)
    refused = [""] * len(pairs)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -scores)) if len(pairs) else []
    for k in order:
        refused[k] = uf.union(int(pairs[k, 0]), int(pairs[k, 1]), max_group_size)
    roots = np.array([uf.find(i) for i in range(len(dx))], dtype=np.int64)
    return roots, refused


# --------------------------------------------------------------------------- assignment


def assign_splits(groups: pd.DataFrame, fractions: FractionsParams, rng: np.random.Generator) -> pd.Series:
    """Split per group (``groups``: index group_id, columns dx and n images), stratified on dx
    and on group size.

    Per class: one of the smallest groups seeds each split (smallest fraction first), so every
    class is in every split. The rest go largest first (ties in seeded random order), each to
    the split whose images would then be the smallest multiple of its target share
    (proportional apportionment). Why not "the split furthest below its target": counted in
    images, that sends every large group to train (its gap is the largest), so val and test
    end up almost only single-image lesions, not the population the model will meet. Going
    proportionally, each split receives its share of the 6-image lesions, of the 2-image
    lesions and of the singles, and the singles at the end even out the image counts.
    """
    target = {s: getattr(fractions, s) for s in SPLITS}
    seed_order = sorted(SPLITS, key=lambda s: (target[s], SPLITS.index(s)))
    out = pd.Series(index=groups.index, dtype=object)
    for dx in sorted(groups["dx"].unique()):
        g = groups[groups["dx"] == dx].sort_index()
        if len(g) < len(SPLITS):
            raise StageError(
                f"split: class {dx!r} has only {len(g)} lesion group(s); at least {len(SPLITS)} are "
                "needed to put it in train, val and test (add images of it or drop the class)"
            )
        tie = rng.permutation(len(g))
        g = g.assign(_tie=tie).sort_values(["n", "_tie"], ascending=[False, True])
        ids, sizes = g.index.to_list(), g["n"].to_list()
        have = dict.fromkeys(SPLITS, 0)
        for s in seed_order:
            out[ids[-1]] = s
            have[s] += sizes[-1]
            ids, sizes = ids[:-1], sizes[:-1]
        for gid, n in zip(ids, sizes, strict=True):
            s = min(SPLITS, key=lambda s: ((have[s] + n) / target[s], -target[s]))
            out[gid] = s
            have[s] += n
    return out


# --------------------------------------------------------------------------- the core


@dataclass(frozen=True)
class SplitTables:
    split: pd.DataFrame
    duplicates: pd.DataFrame
    metrics: dict


def split_dataset(
    meta: pd.DataFrame,
    feats: Features,
    params: SplitParams,
    rng: np.random.Generator,
    *,
    n_candidates: int,
    pairs: np.ndarray,
    dist: np.ndarray,
    scores: np.ndarray,
) -> SplitTables:
    """Metadata rows (sorted by image_id) + features + scored candidates -> split, duplicates."""
    n = len(meta)
    ids = meta["image_id"].to_numpy()
    lesions = meta["lesion_id"].to_numpy()
    dx = meta["dx"].to_numpy()

    verified = np.nan_to_num(scores, nan=-1.0) >= params.verify_threshold
    vp, vd, vs = pairs[verified], dist[verified], scores[verified]
    roots, refused = build_groups(lesions, dx, vp, vs, params.max_group_size)
    for (a, b), why in zip(vp.tolist(), refused, strict=True):
        if why:
            detail = f"{dx[a]} vs {dx[b]}" if why == "diagnosis" else f"over {params.max_group_size} images"
            log.warning("duplicate pair %s ~ %s not joined (%s: %s)", ids[a], ids[b], why, detail)
    # Group ids: dense, in order of each group's smallest image id (rows are sorted by id).
    group_id = pd.factorize(roots)[0]

    frame = pd.DataFrame({"group_id": group_id, "dx": dx})
    # A group's class is its majority dx; only a lesion_id with two dx can mix (validate's error).
    counts = frame.groupby(["group_id", "dx"]).size().unstack(fill_value=0)
    mixed = counts.index[(counts > 0).sum(1) > 1]
    for g in mixed[:20]:
        members = ", ".join(ids[group_id == g][:6])
        log.warning("group %d (%s) has several diagnoses; split by its majority dx", g, members)
    groups = pd.DataFrame({"dx": counts.idxmax(axis=1), "n": counts.sum(1)})
    split_of_group = assign_splits(groups, params.fractions, rng)
    assigned = split_of_group.loc[group_id].to_numpy()

    out = pd.DataFrame(
        {"image_id": ids, "lesion_id": lesions, "group_id": group_id, "dx": dx, "split": assigned}
    )
    # Options: keep one canonical image per group (smallest decodable image_id) where asked.
    rank_key = pd.Series(np.where(feats.ok, "0", "1")) + out["image_id"]
    canonical = rank_key.groupby(out["group_id"]).transform("min") == rank_key
    drop_train = np.zeros(n, dtype=bool)
    drop_eval = np.zeros(n, dtype=bool)
    if params.dedupe_majority_in_train:
        majority = meta["dx"].value_counts().sort_index().idxmax()
        drop_train = ((out["split"] == "train") & (out["dx"] == majority) & ~canonical).to_numpy()
    if params.eval_images == "canonical":
        drop_eval = (out["split"].isin(EVAL_SPLITS) & ~canonical).to_numpy()
    out["assigned_split"] = out["split"]
    out.loc[drop_train | drop_eval, "split"] = DROPPED

    dups = pd.DataFrame(
        {
            "image_id_a": ids[vp[:, 0]],
            "image_id_b": ids[vp[:, 1]],
            "hamming": vd,
            "score": np.round(vs.astype(float), 4),
            "same_lesion": lesions[vp[:, 0]] == lesions[vp[:, 1]],
            "dx_a": dx[vp[:, 0]],
            "dx_b": dx[vp[:, 1]],
            "lesion_id_a": lesions[vp[:, 0]],
            "lesion_id_b": lesions[vp[:, 1]],
            "joined": [not r for r in refused],
            "refused": refused,
        }
    )

    ok = feats.ok
    sizes = pd.Series(lesions[ok]).value_counts()
    same_lesion_pairs = int((sizes * (sizes - 1) // 2).sum())
    cand_same = int((lesions[pairs[:, 0]] == lesions[pairs[:, 1]]).sum()) if len(pairs) else 0
    found_same = int(dups["same_lesion"].sum())
    kept = out[out["split"] != DROPPED]
    m: dict = {
        "n_images": n,
        "n_lesions": int(meta["lesion_id"].nunique()),
        "n_groups": int(out["group_id"].nunique()),
        "largest_group": int(out.groupby("group_id").size().max()) if n else 0,
        "n_candidate_pairs": int(n_candidates),
        "n_near_duplicate_pairs": len(dups),
        "n_cross_lesion_duplicate_pairs": int((~dups["same_lesion"]).sum()),
        "n_cross_diagnosis_duplicate_pairs": int((dups["dx_a"] != dups["dx_b"]).sum()),
        "n_merges_refused_size": refused.count("size"),
        "n_merges_refused_diagnosis": refused.count("diagnosis"),
        "same_lesion_pairs": same_lesion_pairs,
        "same_lesion_candidate_pairs": cand_same,
        "same_lesion_pair_recall": round(found_same / same_lesion_pairs, 4) if same_lesion_pairs else 0.0,
        "n_undecodable": len(feats.errors),
        "n_dropped": int(len(out) - len(kept)),
        "n_dropped_train_majority": int(drop_train.sum()),
        "n_dropped_eval_canonical": int((drop_eval & ~drop_train).sum()),
    }
    classes = list(CLASSES) + sorted(set(dx) - set(CLASSES))
    for s in SPLITS:
        part = kept[kept["split"] == s]
        m[f"{s}_n"] = len(part)
        m[f"{s}_fraction"] = round(len(part) / max(len(kept), 1), 4)
        m[f"{s}_n_groups"] = int(part["group_id"].nunique())
        for c in classes:
            m[f"{s}_n_{c}"] = int((part["dx"] == c).sum())
    m.update(population_metrics(kept, classes))
    return SplitTables(out, dups, m)


def population_profile(part: pd.DataFrame, classes: Sequence[str]) -> dict[str, float]:
    """What kind of cases a set of images holds: images per lesion, and each class's share
    counted per image and per lesion (a lesion's class is its most frequent dx)."""
    n_lesions = part["lesion_id"].nunique()
    lesion_dx = part.groupby("lesion_id")["dx"].agg(lambda d: d.value_counts().index[0])
    prof = {"images_per_lesion": len(part) / max(n_lesions, 1)}
    for c in classes:
        prof[f"image_share_{c}"] = float((part["dx"] == c).mean()) if len(part) else 0.0
        prof[f"lesion_share_{c}"] = float((lesion_dx == c).mean()) if n_lesions else 0.0
    return prof


def population_metrics(kept: pd.DataFrame, classes: Sequence[str]) -> dict[str, float | str]:
    """Each split's population profile beside the whole set's, and the largest relative gap.

    ``max_population_gap`` = max over splits and profile entries of |split - whole| / whole:
    0.05 means every split's images per lesion and every class share (per image and per
    lesion) are within 5% of the whole set's. Val and test decide checkpoints, weights, the
    temperature and the malignant threshold, so they must look like the population."""
    whole = population_profile(kept, classes)
    m: dict[str, float | str] = {k: round(v, 4) for k, v in whole.items()}
    worst, where = 0.0, ""
    for s in SPLITS:
        part = kept[kept["split"] == s]
        m[f"{s}_n_lesions"] = int(part["lesion_id"].nunique())
        for k, v in population_profile(part, classes).items():
            m[f"{s}_{k}"] = round(v, 4)
            if whole[k] > 0 and abs(v - whole[k]) / whole[k] > worst:
                worst, where = abs(v - whole[k]) / whole[k], f"{s} {k}"
    m["max_population_gap"] = round(worst, 4)
    m["max_population_gap_at"] = where
    return m


def leakage(split: pd.DataFrame, dups: pd.DataFrame) -> dict[str, int]:
    """Independent check on the split as written: units found in more than one split.

    Uses ``assigned_split`` when present (a dropped image still belongs to its group's split),
    and only joined duplicate pairs (a refused pair is reported, not claimed)."""
    col = "assigned_split" if "assigned_split" in split.columns else "split"
    where = split.set_index("image_id")[col]
    out = {
        "leaking_group_ids": int((split.groupby("group_id")[col].nunique() > 1).sum()),
        "leaking_lesions": int((split.groupby("lesion_id")[col].nunique() > 1).sum()),
        "leaking_duplicate_pairs": 0,
    }
    if len(dups):
        joined = dups[dups["joined"].astype(str).str.lower() == "true"] if "joined" in dups else dups
        a = where.reindex(joined["image_id_a"]).to_numpy()
        b = where.reindex(joined["image_id_b"]).to_numpy()
        out["leaking_duplicate_pairs"] = int((a != b).sum())
    out["leaking_groups"] = sum(out.values())
    return out
