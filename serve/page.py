"""What the web app shows for an upload: one :class:`Answer` per image (its prediction, or why
there is none, and the metadata given with it) and the page's view of it; the class names, the
input modes' labels and the pages' templates. See :mod:`serve.web`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.decode import Decoded
from serve.predictor import Prediction, Predictor
from serve.upload import MetaRow, Upload, parse_texts
from skinlesion.core.schema import LOCALIZATIONS, SEXES
from skinlesion.measure.scoring import (
    IMAGE_ONLY,
    METADATA,
    UNKNOWN_LOCALIZATION,
    UNKNOWN_SEX,
    MetaArrays,
)

TEMPLATES = Path(__file__).resolve().parent / "templates"
CLASS_NAMES = {
    "akiec": "Actinic keratosis / Bowen's disease",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}
MODE_LABELS = {METADATA: "image with age, sex and site", IMAGE_ONLY: "image only"}
UNKNOWN_ROW = (float("nan"), UNKNOWN_SEX, UNKNOWN_LOCALIZATION)


@dataclass(frozen=True)
class Answer:
    """One image's prediction (or its error) and the metadata given with it (None: none)."""

    prediction: Prediction
    metadata: MetaRow | None = None


def predict_uploads(
    predictor: Predictor, uploads: list[Upload], decoded: list[Decoded], *, explain: bool
) -> list[Answer]:
    """One :class:`Answer` per upload, in order: an image whose metadata does not parse gets an
    error naming the field and the value, the others are predicted (in one model call)."""
    parsed = [parse_texts(u.texts) for u in uploads]
    ok = [i for i, (_, why) in enumerate(parsed) if why is None]
    rows = [parsed[i][0] for i in ok]
    # None when no image came with metadata: the same model input as the CLI's for a plain image.
    meta = MetaArrays.of([r or UNKNOWN_ROW for r in rows]) if any(r is not None for r in rows) else None
    preds = predictor.predict_decoded(
        [uploads[i].name for i in ok], [decoded[i] for i in ok], meta=meta, explain=explain
    )
    by_index = dict(zip(ok, preds, strict=True))
    return [
        Answer(by_index[i], row) if i in by_index else Answer(Prediction(u.name, error=why))
        for i, (u, (row, why)) in enumerate(zip(uploads, parsed, strict=True))
    ]


def metadata_json(row: MetaRow | None) -> dict[str, Any] | None:
    """The metadata given with an image, in the vocabulary (age None when unknown)."""
    if row is None:
        return None
    age, sex, loc = row
    return {"age": age if age == age else None, "sex": SEXES[sex], "localization": LOCALIZATIONS[loc]}


def _given_text(row: MetaRow | None) -> str:
    """``"age 45, female, back"``: the known fields of what was given ("" for none)."""
    d = metadata_json(row) or {}
    parts = [f"age {d['age']:g}" if d.get("age") is not None else ""]
    parts += [d[k] if d.get(k) not in (None, "unknown") else "" for k in ("sex", "localization")]
    return ", ".join(p for p in parts if p)


def result_view(answer: Answer) -> dict[str, Any]:
    """What the page shows for one image."""
    pred = answer.prediction
    return {
        "image": pred.image,
        "error": pred.error,
        "mode": pred.mode,
        "mode_label": MODE_LABELS.get(pred.mode, pred.mode),
        "threshold": pred.threshold,
        "given": _given_text(answer.metadata),
        "risk": pred.risk,
        "risk_class": pred.risk_class,
        "predicted": pred.predicted,
        "refer": pred.refer,
        "malignant_prob": pred.malignant_prob,
        "top": pred.top,
        "gradcam_empty": pred.gradcam_empty,
        "overlay": base64.b64encode(png(pred.overlay)).decode("ascii") if pred.overlay is not None else None,
    }


def png(pixels: Any) -> bytes:
    """An overlay as PNG bytes (Grad-CAM is imported when one is drawn)."""
    from serve.gradcam import png_bytes

    return png_bytes(pixels)
