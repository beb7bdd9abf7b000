"""Served test frames (what ``serve.predict`` writes for the test split), drawn without a model."""

from __future__ import annotations

import numpy as np
import pandas as pd

from skinlesion.core.schema import CLASSES, MALIGNANT
from skinlesion.measure.scoring import IMAGE_ONLY

SHARES = {"akiec": 0.05, "bcc": 0.06, "bkl": 0.11, "df": 0.04, "mel": 0.12, "nv": 0.58, "vasc": 0.04}


def served(n_lesions: int = 400, seed: int = 0) -> pd.DataFrame:
    """A served test frame of an informative model: 1-3 images per lesion, each lesion's images
    sharing its label and part of the model's error (near copies score alike)."""
    rng = np.random.default_rng(seed)
    per_lesion = rng.integers(1, 4, n_lesions)
    dx_lesion = rng.choice(list(CLASSES), n_lesions, p=[SHARES[c] for c in CLASSES])
    lesion = np.repeat(np.arange(n_lesions), per_lesion)
    n = lesion.size
    y = np.array([CLASSES.index(d) for d in dx_lesion])[lesion]
    shared = rng.normal(0, 1, (n_lesions, len(CLASSES)))[lesion]
    logits = shared + rng.normal(0, 0.6, (n, len(CLASSES)))
    logits[np.arange(n), y] += 2.0
    frame = pd.DataFrame({
        "image_id": [f"ISIC_{i:07d}" for i in range(n)],
        "lesion_id": [f"HAM_{k:07d}" for k in lesion],
        "dx": np.asarray(CLASSES)[y],
        "age": "50", "sex": "female", "localization": "back",
    })  # fmt: skip
    return with_probs(frame, logits)


def with_probs(frame: pd.DataFrame, logits: np.ndarray, threshold: float = 0.3) -> pd.DataFrame:
    """``frame``'s request columns with the image-only answers of ``logits`` (softmax, referral
    at ``threshold``, argmax class)."""
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    out = frame[["image_id", "lesion_id", "dx", "age", "sex", "localization"]].copy()
    for i, c in enumerate(CLASSES):
        out[f"prob_{c}"] = probs[:, i]
    mal = probs[:, [CLASSES.index(c) for c in MALIGNANT]].sum(axis=1)
    out["mode"], out["malignant_prob"], out["threshold"] = IMAGE_ONLY, mal, threshold
    out["refer"] = mal >= threshold
    out["predicted"] = np.asarray(CLASSES)[probs.argmax(axis=1)]
    return out
