"""What the synthetic set holds, without pixels: classes, metadata, lesions, ids and clinics.

HAM10000's class shares and metadata distributions, lesions of 1-6 images, a few physical lesions
catalogued under two ``lesion_id`` values, shuffled ids; and the device profiles: each clinic
photographs its own patients (a random stream and id blocks of its own) with its own dermatoscope.
:func:`plan_dataset` is the catalogue :func:`skinlesion.sources.synthetic.generate` draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES
from skinlesion.params.download import SyntheticParams

# --------------------------------------------------------------------------- catalogue model
# Shares and metadata distributions measured on the real HAM10000 metadata (10,015 images).

CLASS_SHARE = {
    "nv": 0.669,
    "mel": 0.112,
    "bkl": 0.108,
    "bcc": 0.052,
    "akiec": 0.033,
    "vasc": 0.014,
    "df": 0.011,
}
# Images per lesion, 1..6. HAM: 74 % single, 19 % two, 7 % three, a handful of 4-6; the tail is
# fattened a little so small sets still contain lesions with 4-6 re-shots to group.
IMAGES_PER_LESION_P = (0.70, 0.19, 0.07, 0.025, 0.01, 0.005)
# Melanomas are photographed more often than naevi (HAM: 1.8 vs 1.2 images per lesion).
SINGLE_SHOT_P = {"nv": 0.78, "mel": 0.55, "bkl": 0.66, "bcc": 0.62, "akiec": 0.68, "vasc": 0.68, "df": 0.62}
DX_TYPE_P = {
    "akiec": {"histo": 1.0},
    "bcc": {"histo": 1.0},
    "mel": {"histo": 1.0},
    "bkl": {"histo": 0.70, "consensus": 0.24, "confocal": 0.06},
    "df": {"histo": 0.49, "consensus": 0.51},
    "vasc": {"histo": 0.49, "consensus": 0.51},
    "nv": {"follow_up": 0.55, "histo": 0.37, "consensus": 0.08},
}
AGE_MEAN_SD = {
    "akiec": (66, 12), "bcc": (67, 14), "bkl": (64, 14), "df": (53, 14),
    "mel": (61, 15), "nv": (46, 15), "vasc": (50, 21),
}  # fmt: skip
MALE_P = {"akiec": 0.69, "bcc": 0.62, "bkl": 0.57, "df": 0.54, "mel": 0.63, "nv": 0.51, "vasc": 0.48}
UNKNOWN_SEX_P = 0.01
SITE_P = {
    "akiec": {"face": 34, "lower extremity": 19, "upper extremity": 19, "back": 9, "scalp": 5,
              "chest": 4, "hand": 4, "neck": 3, "abdomen": 1, "ear": 1},
    "bcc": {"back": 37, "face": 19, "lower extremity": 11, "upper extremity": 10, "chest": 9,
            "abdomen": 4, "scalp": 4, "neck": 3, "trunk": 2, "unknown": 1},
    "bkl": {"face": 29, "back": 19, "lower extremity": 15, "upper extremity": 9, "chest": 7,
            "trunk": 7, "abdomen": 4, "neck": 3, "scalp": 3, "unknown": 2, "ear": 1, "hand": 1},
    "df": {"lower extremity": 72, "upper extremity": 20, "abdomen": 4, "back": 2, "foot": 2},
    "mel": {"back": 29, "upper extremity": 20, "lower extremity": 17, "face": 9, "abdomen": 6,
            "chest": 6, "trunk": 5, "neck": 3, "foot": 2, "ear": 1, "scalp": 1, "unknown": 1},
    "nv": {"lower extremity": 22, "back": 21, "trunk": 18, "abdomen": 13, "upper extremity": 10,
           "foot": 4, "chest": 3, "unknown": 3, "face": 2, "neck": 1, "hand": 1, "genital": 1,
           "scalp": 1, "acral": 0.3},
    "vasc": {"abdomen": 20, "trunk": 20, "lower extremity": 18, "back": 17, "upper extremity": 7,
             "face": 6, "chest": 5, "hand": 4, "neck": 2, "scalp": 2},
}  # fmt: skip
# HAM writes unknown ages as empty cells (57 of 10,015 rows).
UNKNOWN_AGE_SHARE = 0.01
# Which class a lesion may be mistaken for: an "atypical" lesion blends its look with one of these.
LOOKALIKES = {
    "nv": ("mel", "bkl", "df"),
    "mel": ("nv", "bkl"),
    "bkl": ("mel", "nv", "akiec"),
    "bcc": ("akiec", "nv", "mel"),
    "akiec": ("bcc", "bkl"),
    "vasc": ("bcc", "mel"),
    "df": ("nv", "bkl"),
}
FIRST_IMAGE_NUMBER = 24306  # HAM's image numbers start here; ours only look alike
# A set's image numbers are drawn from FIRST_IMAGE_NUMBER + [0, max(3 n, 10,000)) and its lesion
# numbers from [0, max(3 lesions, 10,000)), n <= 200,000 (download.synthetic.n_images): both stay
# below 625,000. Clinic k (a profile) draws from the same spans shifted by k * ID_BLOCK, so two
# profiles never share an image_id or a lesion_id, whatever their seeds and sizes (the default's
# ids look like, and may equal, real HAM10000 ones: ISIC_0024306.., HAM_0000000..; the other
# clinics' cannot). Up to 9 clinics keep 7 digits (^ISIC_\d{7}$, HAM_\d{7}).
ID_BLOCK = 1_000_000
# Clinic k's patients: the generator's streams for seed + k * 2**32. SeedSequence reads an int as
# 32-bit words, and the default's seeds (< 2**31) have no second word: other streams, any seed.
CLINIC_SEED_STRIDE = 2**32


@dataclass(frozen=True)
class DeviceProfile:
    """A clinic: its patients (a random stream and id blocks of its own) and its dermatoscope.

    The device factors apply on top of every lesion's own camera draw, so the draws (and the
    default profile's bytes) stay as they were; the identity values leave a picture bit for bit
    unchanged. They never touch the lesion: only light, optics, sensor and export.
    """

    name: str
    description: str  # one line for --help
    clinic: int  # 0 = the default set's; picks the patients' stream and the id blocks
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)  # white balance (R, G, B)
    gamma: float = 1.0  # tone curve exponent: > 1 darkens the mid-tones, < 1 lightens them
    vignette: float = 0.0  # added to the lens fall-off at the corner (default draws 0.1-0.5)
    noise: float = 1.0  # sensor noise, times the default's
    max_jpeg_quality: int = 100  # the clinic's export caps download.synthetic.jpeg_quality


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile("default", "the embedded set's devices, neutral white balance", 0),
        # Halogen light reads warm (red-yellow, little blue); an older optic falls off strongly
        # towards the corners; a cheaper sensor is noisier; the clinic exports at quality 75.
        DeviceProfile(
            "clinic_b",
            "another clinic, halogen dermatoscope: warm cast, darker mid-tones, strong vignette, JPEG <= 75",
            1,
            gains=(1.08, 0.96, 0.78),
            gamma=1.3,
            vignette=0.3,
            noise=1.6,
            max_jpeg_quality=75,
        ),
        # White LEDs read cool (blue); polarised LED devices light the field evenly and brightly.
        DeviceProfile(
            "clinic_c",
            "another clinic, LED dermatoscope: cool cast, brighter mid-tones, almost no vignette",
            2,
            gains=(0.90, 1.0, 1.10),
            gamma=0.8,
            vignette=-0.1,
        ),
    )
}


class Shot(NamedTuple):
    """One image file of a physical lesion."""

    lesion_id: str
    image_id: str
    view: int  # seeds the camera pose and light: same view = same photograph
    copy: int  # 0 = the photograph itself; 1 = the same photograph exported again (new noise)


@dataclass(frozen=True)
class LesionPlan:
    """One physical lesion: its catalogue entries and how each photograph is seeded."""

    index: int  # seeds the lesion's RNG
    dx: str
    look: str  # the class whose look it borrows (== dx for a typical lesion)
    blend: float  # how far towards ``look`` (0 = typical)
    shots: tuple[Shot, ...]  # every image, over all its catalogue entries
    meta: dict[str, str] = field(default_factory=dict)  # dx_type, age, sex, localization


def rng_stream(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def min_lesions_per_class(n_images: int) -> int:
    """Lesion floor per class: a group split needs a few lesions of every class in every split."""
    return min(8, max(1, n_images // 40))


def class_quotas(n_images: int) -> dict[str, int]:
    """Images per class: HAM's shares, each minority class lifted to the lesion floor, nv the rest."""
    floor = min_lesions_per_class(n_images)
    quotas = {c: max(round(CLASS_SHARE[c] * n_images), floor) for c in CLASSES if c != "nv"}
    quotas["nv"] = n_images - sum(quotas.values())
    if quotas["nv"] < floor:
        raise StageError(f"download.synthetic.n_images: {n_images} is too small; use at least {len(CLASSES)}")
    return {c: quotas[c] for c in CLASSES}


def lesion_sizes(n: int, dx: str, max_per_lesion: int, floor: int, rng: np.random.Generator) -> list[int]:
    """Cut ``n`` images of a class into lesions of 1..max images, at least ``floor`` lesions."""
    rest = np.array(IMAGES_PER_LESION_P[1:max_per_lesion])
    p = np.r_[SINGLE_SHOT_P[dx], (1 - SINGLE_SHOT_P[dx]) * rest / rest.sum()] if len(rest) else np.ones(1)
    sizes: list[int] = []
    remaining = n
    while remaining > 0:
        still_needed = max(0, floor - len(sizes) - 1)  # lesions that must follow this one
        cap = max(1, min(max_per_lesion, remaining - still_needed))
        q = p[:cap] / p[:cap].sum()
        k = int(rng.choice(cap, p=q)) + 1
        sizes.append(k)
        remaining -= k
    return sizes


def _lesion_meta(dx: str, rng: np.random.Generator) -> dict[str, str]:
    mean, sd = AGE_MEAN_SD[dx]
    age = float(np.clip(round(rng.normal(mean, sd) / 5) * 5, 5, 85))
    sex = "unknown" if rng.random() < UNKNOWN_SEX_P else ("male" if rng.random() < MALE_P[dx] else "female")
    return {
        "dx_type": _pick(rng, DX_TYPE_P[dx]),
        "age": f"{age:.1f}",
        "sex": sex,
        "localization": _pick(rng, SITE_P[dx]),
    }


def plan_catalogue(
    n_images: int,
    max_images_per_lesion: int,
    cross_id_duplicate_rate: float,
    atypical_rate: float,
    rng: np.random.Generator,
    first_image_number: int = FIRST_IMAGE_NUMBER,
    first_lesion_number: int = 0,
) -> list[LesionPlan]:
    """The catalogue without pixels: physical lesions, their lesion_ids, image_ids and metadata.

    Exactly ``n_images`` images. A cross-id duplicate turns an existing catalogue entry into a
    second lesion_id of another physical lesion of the same class (the image total stays exact);
    only classes with lesions to spare above the floor give one up.
    """
    floor = min_lesions_per_class(n_images)
    entries: list[tuple[str, int]] = []  # (dx, n images) per lesion_id
    for dx, quota in class_quotas(n_images).items():
        entries += [(dx, k) for k in lesion_sizes(quota, dx, max_images_per_lesion, floor, rng)]
    n_entries = len(entries)

    # phys[e] = the physical lesion behind catalogue entry e (itself unless it is a duplicate).
    phys = list(range(n_entries))
    n_dup = round(cross_id_duplicate_rate * n_entries)
    if cross_id_duplicate_rate > 0:
        n_dup = max(n_dup, 1)
    by_class: dict[str, list[int]] = {c: [] for c in CLASSES}
    for e, (dx, _) in enumerate(entries):
        by_class[dx].append(e)
    independent = {c: len(by_class[c]) for c in CLASSES}
    used: set[int] = set()
    for e in rng.permutation(n_entries).tolist():
        if n_dup == 0:
            break
        dx = entries[e][0]
        if e in used or independent[dx] <= floor + 1:
            continue
        same_class = by_class[dx]
        for _ in range(20):  # free targets abound: duplicates are a small share of lesions
            t = same_class[int(rng.integers(len(same_class)))]
            if t != e and t not in used:
                break
        else:
            continue
        phys[e] = t
        used |= {e, t}
        independent[dx] -= 1
        n_dup -= 1

    # Shuffled ids: neither their order nor their value tells the class or the lesion.
    image_numbers = rng.choice(max(3 * n_images, 10_000), size=n_images, replace=False) + first_image_number
    lesion_numbers = (
        rng.choice(max(3 * n_entries, 10_000), size=n_entries, replace=False) + first_lesion_number
    )
    metas = [_lesion_meta(dx, rng) for dx, _ in entries]
    unknown_age = rng.choice(n_entries, size=round(UNKNOWN_AGE_SHARE * n_entries), replace=False)
    for e in unknown_age.tolist():
        metas[e]["age"] = ""

    looks: dict[int, tuple[str, float]] = {}
    shots: dict[int, list[Shot]] = {}
    next_image = 0
    for e, (dx, k) in enumerate(entries):
        p = phys[e]
        if p not in looks:
            atypical = rng.random() < atypical_rate
            look = LOOKALIKES[dx][int(rng.integers(len(LOOKALIKES[dx])))] if atypical else dx
            looks[p] = (look, float(rng.uniform(0.35, 0.9)) if atypical else 0.0)
        lst = shots.setdefault(p, [])
        # A second catalogue entry of a lesion starts with the first photograph exported again,
        # as archives receive the same file twice; its other images are new re-shots.
        reexport = bool(lst)
        for j in range(k):
            view, copy = (lst[0].view, 1) if reexport and j == 0 else (len(lst), 0)
            lesion_id, image_id = f"HAM_{lesion_numbers[e]:07d}", f"ISIC_{image_numbers[next_image]:07d}"
            lst.append(Shot(lesion_id, image_id, view, copy))
            next_image += 1
    # The same physical lesion is the same patient: a duplicate entry inherits the metadata.
    return [
        LesionPlan(p, entries[p][0], looks[p][0], looks[p][1], tuple(shots[p]), metas[p])
        for p in sorted(shots)
    ]


def plan_dataset(params: SyntheticParams, seed: int) -> list[LesionPlan]:
    """The catalogue ``generate`` draws for these params and seed (cheap: no pixels).

    The profile's clinic has patients of its own: its catalogue comes from its own stream, its
    image_ids and lesion_ids from its own block of numbers."""
    block = PROFILES[params.profile].clinic * ID_BLOCK
    return plan_catalogue(
        params.n_images,
        params.max_images_per_lesion,
        params.cross_id_duplicate_rate,
        params.atypical_rate,
        rng_stream(clinic_seed(params.profile, seed), 0),
        FIRST_IMAGE_NUMBER + block,
        block,
    )


def clinic_seed(profile: str, seed: int) -> int:
    """The seed of the profile's patients (``seed`` itself for the default profile)."""
    return seed + PROFILES[profile].clinic * CLINIC_SEED_STRIDE
