"""The HAM10000 vocabulary: metadata columns, diagnoses, the malignant set, sexes, sites."""

from __future__ import annotations

# The exact HAM10000 metadata columns, in the original order.
HAM_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
# The seven HAM10000 diagnoses; "malignant" is mel + bcc + akiec.
CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
MALIGNANT: tuple[str, ...] = ("akiec", "bcc", "mel")
DX_TYPES: tuple[str, ...] = ("histo", "follow_up", "consensus", "confocal")
SEXES: tuple[str, ...] = ("male", "female", "unknown")
LOCALIZATIONS: tuple[str, ...] = (
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand",
    "lower extremity", "neck", "scalp", "trunk", "unknown", "upper extremity",
)  # fmt: skip
