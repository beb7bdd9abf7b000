"""The embedded default data set: procedurally drawn, HAM10000-shaped dermoscopy images.

Why synthetic: a fresh machine has no real data (HAM10000 is large and licence-bound), yet the
whole pipeline - leakage-safe splitting, validation, training, calibration, drift - must run
offline in minutes. So this module draws a set with the properties the pipeline has to handle:

* the exact HAM10000 metadata columns and value sets, with class-dependent dx_type, age, sex and
  site measured on the real metadata, and shuffled ids that reveal neither class nor lesion;
* the 7 classes with HAM's imbalance (nv ~ 2/3, df ~ 1 %), but a floor of lesions per class so
  a train/val/test group split stays possible on a few hundred images;
* lesions with 1-6 images whose re-shots are near-duplicates (moved, turned, zoomed, re-lit,
  re-compressed), and a few physical lesions catalogued under two ``lesion_id`` values: the
  leakage the split stage's duplicate detection must catch;
* dermoscopy-like pictures: skin of varied tone and texture, hairs, a dermatoscope vignette or
  black ring, and a lesion whose size, shape, border, colours and structures (pigment network,
  globules, vessels, lacunae, scale, white scar) follow its class; a share of lesions borrows
  the look of a look-alike class, so a model can learn the task but never perfectly.

Device profiles (``download.synthetic.profile``, ``--profile``): ``default`` is the set above;
each other profile is another clinic, photographing its own patients with its own dermatoscope:
a colour cast, other mid-tones, another lens fall-off, sensor and JPEG export. A drift check must
flag such a batch; a classifier must still see its lesions (same classes, same looks). A clinic's
lesions come from its own random stream and its image_ids and lesion_ids from its own block of
numbers (``ID_BLOCK``), so a labelled batch from another clinic can join the default set as
training data without reusing an id or a lesion of it, whatever the two seeds and sizes.

Determinism: the catalogue comes from one RNG, and each physical lesion (and each of its shots)
from its own ``SeedSequence(seed, spawn_key=...)``, so the bytes are identical for a seed
whatever the number of worker processes; and whatever the CPU (with or without AVX-512, AVX2,
FMA): the drawing uses no function whose last bits depend on it (see "platform-exact maths").
tests/unit/test_synthetic_platform.py pins the bytes and re-draws them with numpy's SIMD
kernels and libjpeg-turbo's switched off.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.outputs import atomic_dir
from skinlesion.core.parallel import n_workers
from skinlesion.core.schema import CLASSES, HAM_COLUMNS
from skinlesion.params.base import BaseParams
from skinlesion.params.download import DownloadParams, SyntheticParams
from skinlesion.params.schema import Sections, build_section, load_sections

log = logging.getLogger(__name__)

__all__ = [
    "SyntheticResult",
    "DeviceProfile",
    "PROFILES",
    "LesionPlan",
    "Shot",
    "plan_catalogue",
    "plan_dataset",
    "clinic_seed",
    "render_lesion",
    "generate",
    "main",
]

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


@dataclass(frozen=True)
class SyntheticResult:
    n_images: int
    n_lesions: int  # distinct lesion_id values
    class_counts: dict[str, int]  # images per class
    n_cross_id_duplicates: int = 0  # lesion_ids that re-photograph another lesion_id's lesion


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


def _seq(seed: int, *key: int) -> np.random.Generator:
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


# --------------------------------------------------------------------------- platform-exact maths
# The same seed draws the same bytes on every machine, not only on the one that made dvc.lock.
# numpy hands sin, cos, exp, log, arctan2, hypot and power (float32 and float64) to SIMD kernels it
# picks at run time by CPU (AVX-512, AVX2, SSE, NEON), and their last bits differ; libm's (math.sin,
# math.exp, a float's **) differ between its FMA and non-FMA builds. One such bit can move a value
# across a rounding step, a border-table index or a mask edge, and so change a JPEG. So the
# drawing calls none of them: the functions below use only + - * /, sqrt, rint, frexp, ldexp,
# abs, min/max and where, in a fixed order, on float64 numbers or Python floats. IEEE 754 rounds
# each of those exactly, on every CPU and in every SIMD width, and numpy never fuses two ufuncs
# into one FMA. Accuracy ~1e-15, far below what a pixel sees; exactness is the point.
# (numpy's random streams are integer algorithms; the few libm calls inside its normal sampler
# only decide rare rejections and tails, where a last-bit difference has odds ~1e-15 to matter.)

_PIO2_HI = 1.57079632673412561417e00  # pi/2 in 33 bits: k * _PIO2_HI is exact for |k| < 2**20
_PIO2_LO = 6.07710050650619224932e-11  # pi/2 - _PIO2_HI
_LN2_HI = 6.93147180369123816490e-01  # ln 2 in 32 bits, exact times any |k| < 2**20
_LN2_LO = 1.90821492927058770002e-10
# fdlibm's minimax kernels: sin on |r| <= pi/4 (odd terms from r^3), cos (even terms from r^4),
# atan on |z| <= 7/16 (alternating even and odd powers of z^4).
_SIN = (-1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04,
        2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10)  # fmt: skip
_COS = (4.16666666666666019037e-02, -1.38888888888741095749e-03, 2.48015872894767294178e-05,
        -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11)  # fmt: skip
_ATAN = (3.33333333333329318027e-01, -1.99999999998764832476e-01, 1.42857142725034663711e-01,
         -1.11111104054623557880e-01, 9.09088713343650656196e-02, -7.69187620504482999495e-02,
         6.66107313738753120669e-02, -5.83357013379057348645e-02, 4.97687799461593236017e-02,
         -3.65315727442169155270e-02, 1.62858201153657823623e-02)  # fmt: skip
_EXP = tuple(1 / math.factorial(n) for n in range(14))  # Taylor on |r| <= ln2/2: error < 1e-17
_ATANH = tuple(1 / (2 * n + 1) for n in range(12))  # log(m) = 2 atanh(f), |f| <= 0.172
_TAN_PI_8 = 0.41421356237309503
_SQRT_HALF = 0.70710678118654757


def _poly(z, coefs: tuple[float, ...]):
    """coefs[0] + coefs[1] z + ... by Horner: one fixed order of operations."""
    acc = coefs[-1]
    for c in coefs[-2::-1]:
        acc = acc * z + c
    return acc


def _sincos_reduced(r):
    """sin and cos of ``r`` in [-pi/4, pi/4] (a float or a float64 array)."""
    z = r * r
    return r + r * z * _poly(z, _SIN), 1.0 - 0.5 * z + z * z * _poly(z, _COS)


def _sincos(x):
    """(sin, cos) of ``x`` (float64 array, |x| < 1e5): platform-exact."""
    x = np.asarray(x, dtype=np.float64)
    k = np.rint(x * (2 / math.pi))
    s, c = _sincos_reduced((x - k * _PIO2_HI) - k * _PIO2_LO)
    q = k.astype(np.int64) & 3  # which quarter turn: x = r + q pi/2
    return np.choose(q, (s, c, -s, -c)), np.choose(q, (c, -s, -c, s))


def _sc(x: float) -> tuple[float, float]:
    """(sin, cos) of one float, as :func:`_sincos` computes it, ~30 times faster in pure Python."""
    k = round(x * (2 / math.pi))
    s, c = _sincos_reduced((x - k * _PIO2_HI) - k * _PIO2_LO)
    return ((s, c), (c, -s), (-s, -c), (-c, s))[k & 3]


def _exp(x):
    """exp of ``x`` (float64 array), clipped to [-700, 700]: platform-exact."""
    x = np.clip(np.asarray(x, dtype=np.float64), -700.0, 700.0)
    k = np.rint(x * 1.4426950408889634)  # 1 / ln 2, a literal: libm must not pick k
    return np.ldexp(_poly((x - k * _LN2_HI) - k * _LN2_LO, _EXP), k.astype(np.int32))


def _log(x):
    """Natural log of ``x`` (float64 array, x > 0): platform-exact."""
    m, e = np.frexp(np.asarray(x, dtype=np.float64))  # x = m 2**e, m in [0.5, 1): exact
    small = m < _SQRT_HALF
    m, e = np.where(small, m * 2, m), (e - small).astype(np.float64)
    f = (m - 1) / (m + 1)
    return e * _LN2_HI + (e * _LN2_LO + 2 * f * _poly(f * f, _ATANH))


def _pow(x, p: float):
    """``x ** p`` for x >= 0 (float64 array; 0 ** p = 0): platform-exact."""
    x = np.asarray(x, dtype=np.float64)
    pos = x > 0
    return np.where(pos, _exp(p * _log(np.where(pos, x, 1.0))), 0.0)


def _atan2(y, x):
    """arctan2 (float64 arrays, result in [-pi, pi]): platform-exact."""
    y, x = np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)
    ay, ax = np.abs(y), np.abs(x)
    big, small = np.maximum(ay, ax), np.minimum(ay, ax)
    a = small / np.where(big > 0, big, 1.0)  # tan of the angle to the nearer axis, [0, 1]
    far = a > _TAN_PI_8
    z = np.where(far, (a - 1) / (a + 1), a)  # atan(a) = pi/4 + atan(z) above tan(pi/8)
    z2 = z * z
    w = z2 * z2
    t = z - z * (z2 * _poly(w, _ATAN[0::2]) + w * _poly(w, _ATAN[1::2]))
    t = np.where(far, math.pi / 4 + t, t)
    t = np.where(ay > ax, math.pi / 2 - t, t)
    t = np.where(x < 0, math.pi - t, t)
    return np.where(y < 0, -t, t)


def _hypot(x, y):
    """sqrt(x^2 + y^2): sqrt is exactly rounded everywhere, np.hypot (libm) is not."""
    return np.sqrt(x * x + y * y)


# --------------------------------------------------------------------------- drawing helpers
# Lengths are in "units" of half the output image height, so the look does not depend on the
# resolution. A physical lesion is drawn once on a canvas larger than the photograph; each
# photograph is an affine view of that canvas, so re-shots show the same lesion, skin and hairs.
# Exact on every x86 CPU: the numpy steps are elementwise IEEE arithmetic (float32 or float64) or
# the exact functions above, never a SIMD transcendental, a BLAS call or a float sum; the Pillow
# steps (resize, affine view, drawing, blur, lookup, JPEG) are one compiled binary for all x86
# (baseline SSE2, no FMA, no run-time CPU dispatch; libjpeg-turbo's SIMD paths are integer and
# bit-identical to its C code), and their float parts run on inputs already exact.

CANVAS = 1.3  # canvas / photograph size: room for the re-shot's shift, turn and zoom
F32 = np.float32


def _smoothstep(a: float, b: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - F32(a)) * F32(1 / (b - a)), 0, 1)
    return t * t * (3 - 2 * t)


def _noise(rng: np.random.Generator, shape: tuple[int, int], cell: float, octaves: int = 1) -> np.ndarray:
    """Smooth value noise in [0, 1] (fractal if octaves > 1): a random lattice, bicubic-upsampled."""
    h, w = shape
    total = np.zeros(shape, dtype=F32)
    for o in range(octaves):
        c = max(cell / 2**o, 1.5)
        grid = rng.random((int(h / c) + 4, int(w / c) + 4), dtype=F32)
        layer = Image.fromarray(grid, "F").resize((w, h), Image.BICUBIC, box=(1, 1, 1 + w / c, 1 + h / c))
        total += np.asarray(layer) * F32(math.ldexp(1.0, -o))  # 0.5 ** o
    lo, hi = total.min(), total.max()
    return (total - lo) / (hi - lo + F32(1e-6))


def _region(n: np.ndarray, inside: np.ndarray, coverage: float, edge: float = 0.04) -> np.ndarray:
    """Soft mask of the ``coverage`` share of the lesion where the noise ``n`` is highest."""
    vals = n[inside > 0.5]
    if coverage <= 0 or vals.size == 0:
        return np.zeros_like(n)
    thr = float(np.quantile(vals, 1 - min(coverage, 1.0)))
    return _smoothstep(thr - edge, thr + edge, n) * inside


def _mix(img: np.ndarray, colour, weight: np.ndarray) -> np.ndarray:
    """Paint ``colour`` (RGB triple or image) over ``img`` with per-pixel opacity ``weight``."""
    w = weight[..., None]
    return img + (np.asarray(colour, dtype=F32) - img) * w


def _marks(shape: tuple[int, int], draw_fn, blur: float) -> np.ndarray:
    """A [0, 1] mask drawn with PIL (lines, dots), softened so it looks optical, not vector."""
    mask = Image.new("L", (shape[1], shape[0]), 0)
    draw_fn(ImageDraw.Draw(mask))
    if blur > 0:
        mask = mask.filter(ImageFilter.BoxBlur(blur))
    return np.asarray(mask, dtype=F32) * F32(1 / 255)


# --------------------------------------------------------------------------- class looks
# Each class samples a concrete look; distributions overlap on purpose. Colours are sRGB.

_CLASS_LOOK = {
    #        base colour          radius        irregular    asym        border noise  softness
    "nv": ((135, 88, 62), 28, (0.28, 0.58), (0.01, 0.05), (0.0, 0.06), (0.02, 0.07), (0.05, 0.14)),
    "mel": ((92, 60, 52), 22, (0.42, 0.85), (0.06, 0.16), (0.08, 0.22), (0.08, 0.22), (0.04, 0.18)),
    "bkl": ((160, 118, 88), 28, (0.38, 0.78), (0.03, 0.10), (0.02, 0.12), (0.04, 0.10), (0.02, 0.07)),
    "bcc": ((206, 142, 140), 16, (0.28, 0.62), (0.04, 0.11), (0.03, 0.12), (0.08, 0.18), (0.14, 0.30)),
    "akiec": ((200, 118, 106), 16, (0.32, 0.68), (0.06, 0.14), (0.03, 0.12), (0.12, 0.24), (0.18, 0.35)),
    "vasc": ((168, 48, 74), 20, (0.18, 0.42), (0.01, 0.05), (0.0, 0.06), (0.02, 0.06), (0.03, 0.09)),
    "df": ((168, 118, 92), 20, (0.20, 0.42), (0.01, 0.05), (0.0, 0.06), (0.06, 0.14), (0.18, 0.32)),
}
BLACK, BLUE_GREY, RED, VEIL = (38, 28, 32), (100, 104, 134), (160, 72, 74), (196, 190, 212)
DARK_BROWN, LIGHT_BROWN = (78, 48, 36), (168, 118, 82)


def _vary_colour(colour, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Lighter or darker, a little redder or browner: independent channel noise would turn
    brown into olive or magenta, colours no naevus has."""
    # Darker pigment stays reddish-brown, lighter turns tan: per-channel exponents of lightness.
    c = np.asarray(colour, float) * _exp(rng.normal(0, spread) * np.array([0.8, 1.0, 1.15]))
    c += (c[0] + c[1] + c[2]) / 3 * rng.normal(0, 0.035) * np.array([1.0, -0.5, -0.6]) + rng.normal(0, 3, 3)
    return np.clip(c, 20, 240)


def _class_look(cls: str, rng: np.random.Generator) -> dict:
    """A concrete look for a lesion of class ``cls``: numbers (blendable) and structure counts."""
    base, jitter, radius, irregular, asym, border_noise, soft = _CLASS_LOOK[cls]
    u = rng.uniform
    look = {
        "base": _vary_colour(base, jitter / 100, rng),
        "radius": u(*radius),
        "aspect": u(1.0, 1.35),
        "irregular": u(*irregular),
        "asym": u(*asym),
        "border_noise": u(*border_noise),
        "soft": u(*soft),
        "opacity": u(0.85, 1.0),
        "centre_dark": u(0.0, 0.15),
        "mottle": u(0.05, 0.15),
        "network": 0.0,
        "peripheral_network": 0.0,
        "dots": 0.0,
        "dot_colour": np.array(DARK_BROWN, float),
        "milia": 0.0,
        "vessels": 0.0,
        "lacunae": 0.0,
        "scale": 0.0,
        "white_centre": 0.0,
        "cerebriform": 0.0,
        "halo": u(0.0, 0.08),
        "blotches": [],  # (colour, coverage) patches
        "lobe": 0.0,
    }
    if cls == "nv":
        look.update(
            centre_dark=u(0.1, 0.35),
            network=u(0.0, 0.35) * (rng.random() < 0.6),
            dots=u(0, 12) * (rng.random() < 0.4),
            lobe=u(0, 0.5) * (rng.random() < 0.1),
        )
        if rng.random() < 0.25:
            look["blotches"] = [(DARK_BROWN, u(0.1, 0.3))]
    elif cls == "mel":
        look.update(
            mottle=u(0.15, 0.3),
            network=u(0.1, 0.4) * (rng.random() < 0.5),
            dots=u(5, 35),
            dot_colour=np.array(BLACK, float),
            lobe=u(0.3, 0.8) * (rng.random() < 0.4),
        )
        palette = [BLACK, BLUE_GREY, RED, VEIL, LIGHT_BROWN, DARK_BROWN]
        pick = rng.choice(len(palette), size=int(rng.integers(2, 5)), replace=False)
        look["blotches"] = [(palette[i], u(0.08, 0.3)) for i in pick]
    elif cls == "bkl":
        look.update(
            mottle=u(0.1, 0.2),
            cerebriform=u(0.15, 0.4) * (rng.random() < 0.65),
            milia=u(2, 14) * (rng.random() < 0.6),
            opacity=u(0.7, 0.95),
            lobe=u(0, 0.6) * (rng.random() < 0.2),
        )
        if rng.random() < 0.3:
            look["blotches"] = [(DARK_BROWN, u(0.1, 0.25))]
    elif cls == "bcc":
        look.update(
            opacity=u(0.5, 0.8),
            vessels=u(3, 9),
            halo=u(0.1, 0.3),
            white_centre=u(0.0, 0.35) * (rng.random() < 0.5),
        )
        if rng.random() < 0.5:  # blue-grey ovoid nests
            look["blotches"] = [(BLUE_GREY, u(0.08, 0.2))]
            look["dots"], look["dot_colour"] = u(2, 8), np.array(BLUE_GREY, float)
        if rng.random() < 0.25:  # ulceration: dark red crust
            look["blotches"] = [*look["blotches"], ((110, 40, 40), u(0.05, 0.15))]
    elif cls == "akiec":
        look.update(
            opacity=u(0.5, 0.8),
            scale=u(0.1, 0.3),
            halo=u(0.15, 0.4),
            mottle=u(0.1, 0.2),
            milia=u(10, 40),
            vessels=u(0, 3) * (rng.random() < 0.4),
        )
    elif cls == "vasc":
        look.update(lacunae=u(0.6, 1.0), halo=u(0.05, 0.2), opacity=u(0.9, 1.0))
    elif cls == "df":
        look.update(white_centre=u(0.45, 0.85), peripheral_network=u(0.2, 0.45), halo=u(0.0, 0.12))
    return look


def _blend_looks(a: dict, b: dict, t: float) -> dict:
    """Numbers move ``t`` of the way from ``a`` to ``b``; lists are taken from the nearer one."""
    out = {}
    for k, va in a.items():
        vb = b[k]
        if isinstance(va, list):
            out[k] = vb if t > 0.5 else va
        else:
            out[k] = (1 - t) * np.asarray(va, float) + t * np.asarray(vb, float)
            if np.ndim(out[k]) == 0:
                out[k] = float(out[k])
    return out


SKIN_TONES = np.array(
    [(236, 196, 186), (228, 182, 170), (222, 186, 160), (214, 168, 150), (236, 208, 200),
     (218, 186, 196), (200, 152, 128), (182, 134, 110), (230, 172, 160)],
    dtype=F32,
)  # fmt: skip
BORDER_TABLE = 2048  # samples of the border radius over the (diamond) angle
# Higher harmonics of the outline fade as k ** 0.6 (the exact power: libm's ** is not).
_HARMONIC_FALLOFF = {k: float(_pow(float(k), 0.6)) for k in range(3, 10)}


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The diamond angle of (u, v): in [0, 4), monotone in the true angle (0 = +u axis, 1 = +v).
    One division instead of an arctan2: exact float32 arithmetic, and fast on a whole canvas."""
    s = np.abs(u) + np.abs(v)
    t = v / np.where(s > 0, s, F32(1))
    p = np.where(u >= 0, t, 2 - t)
    return np.where(p < 0, p + 4, p)


def _diamond_angles(n: int) -> np.ndarray:
    """The true angle (radians, float64) at the centre of each of ``n`` equal diamond-angle bins."""
    p = (np.arange(n) + 0.5) * (4 / n)
    t = np.where(p < 1, p, np.where(p < 3, 2 - p, p - 4))  # v on the unit diamond |u| + |v| = 1
    return _atan2(t, np.where((p < 1) | (p >= 3), 1 - np.abs(t), np.abs(t) - 1))


_BORDER_ANGLES = _diamond_angles(BORDER_TABLE)


class _Table:
    """``f`` on [lo, hi], sampled at n + 1 points and read back by linear interpolation: float32
    arithmetic, exact on every CPU like ``f`` itself, and ~10x cheaper per pixel than evaluating it.
    Inputs are clipped to [lo, hi]."""

    def __init__(self, f, lo: float, hi: float, n: int) -> None:
        self.lo, self.scale, self.n = F32(lo), F32(n / (hi - lo)), n
        v = f(np.linspace(lo, hi, n + 1)).astype(F32)
        self.v, self.dv = v, np.append(np.diff(v), F32(0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = np.clip((x - self.lo) * self.scale, 0, self.n)
        i = np.floor(t)
        k = i.astype(np.intp)
        return self.v[k] + self.dv[k] * (t - i)


_FADE = _Table(lambda d: _exp(-2.5 * d), 0.0, 16.0, 4096)  # the erythema halo's fall-off
_CORE_DARK = _Table(lambda c: _pow(c, 0.7), 0.0, 1.0, 4096)  # how the centre darkens


@dataclass(frozen=True)
class _Camera:
    """What belongs to the dermatoscope, not the skin: fixed within a lesion's photographs."""

    vignette: float
    ring: float  # radius of the black ring, in half-diagonals (0 = no ring)
    gains: tuple[float, float, float]


def draw_canvas(
    dx: str, look_cls: str, blend: float, rng: np.random.Generator, width: int, height: int
) -> tuple[Image.Image, _Camera]:
    """The physical lesion on its patch of skin: an RGB canvas larger than the photograph."""
    unit = height / 2
    hc, wc = int(round(height * CANVAS)), int(round(width * CANVAS))
    shape = (hc, wc)
    look = _class_look(dx, rng)
    if blend > 0:
        look = _blend_looks(look, _class_look(look_cls, rng), blend)

    # ---- skin: a tone, slow unevenness, fine texture (pores and furrows), patchy redness
    pair = rng.choice(len(SKIN_TONES), size=2, replace=False)
    tone = _mix(SKIN_TONES[pair[0]], SKIN_TONES[pair[1]], F32(rng.random())) + rng.normal(0, 5, 3).astype(F32)
    shading = (
        1
        + F32(0.10) * (_noise(rng, shape, 0.8 * unit) - 0.5)
        + F32(0.06) * (_noise(rng, shape, 0.05 * unit, octaves=2) - 0.5)
    )
    skin = tone * shading[..., None]
    redness = 0.25 * rng.uniform(0, 1)
    if redness > 0.02:
        skin = _mix(skin, (200, 110, 120), F32(redness) * _noise(rng, shape, 0.5 * unit))

    # ---- lesion outline: an ellipse with a Fourier-harmonic border, a noisy edge, maybe a lobe
    # The angle picks a border-table entry: a last-bit difference there would move the outline
    # by a pixel, so it is the diamond angle (exact arithmetic), not a SIMD arctan2.
    x = (np.arange(wc, dtype=F32) + F32(0.5 - wc / 2)) * F32(1 / unit)
    y = (np.arange(hc, dtype=F32) + F32(0.5 - hc / 2)) * F32(1 / unit)
    cx, cy = (float(c) for c in rng.normal(0, 0.1, 2))
    sin_a, cos_a = _sc(float(rng.uniform(0, np.pi)))
    dxr, dyr = (x - F32(cx))[None, :], (y - F32(cy))[:, None]
    u = (dxr * F32(cos_a) + dyr * F32(sin_a)) * F32(1 / look["aspect"])
    v = dyr * F32(cos_a) - dxr * F32(sin_a)
    border = np.ones(BORDER_TABLE)
    for k in range(1, 10):
        amp = (look["asym"] if k <= 2 else look["irregular"] / _HARMONIC_FALLOFF[k]) * rng.normal(0, 1)
        border += amp * _sincos(k * _BORDER_ANGLES + rng.uniform(0, 2 * np.pi))[1]
    radius_table = (look["radius"] * np.maximum(border, 0.35)).astype(F32)
    idx = (_diamond(u, v) * F32(BORDER_TABLE / 4)).astype(np.int32) % BORDER_TABLE
    rho = _hypot(u, v) / radius_table[idx]
    rho += F32(2 * look["border_noise"]) * (_noise(rng, shape, 0.15 * unit, octaves=2) - 0.5)
    if look["lobe"] > 0.05:
        la = float(rng.uniform(0, 2 * np.pi))
        lr = look["radius"] * rng.uniform(0.35, 0.6)
        lx, ly = cx + _sc(la)[1] * look["radius"] * 0.9, cy + _sc(la)[0] * look["radius"] * 0.9
        lobe = _hypot((x - F32(lx))[None, :], (y - F32(ly))[:, None]) * F32(1 / lr)
        rho = np.minimum(rho, lobe + F32(0.15 * (1 - look["lobe"])))
    soft = look["soft"]
    inside = 1 - _smoothstep(1 - soft, 1 + soft, rho)

    # ---- lesion body, computed only in the lesion's bounding box (most lesions are small)
    rows, cols = np.flatnonzero(inside.max(1) > 0.002), np.flatnonzero(inside.max(0) > 0.002)
    if rows.size == 0:  # a degenerate outline: keep the skin, it is still a valid photograph
        rows, cols = np.arange(hc // 2, hc // 2 + 1), np.arange(wc // 2, wc // 2 + 1)
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    ins, rh = inside[box], rho[box]
    crop = ins.shape
    core = np.clip(1 - rh, 0, 1)
    mottle = _noise(rng, crop, 0.12 * unit, octaves=3) - 0.5
    body = look["base"].astype(F32) * (1 + F32(2 * look["mottle"]) * mottle)[..., None]
    body *= (1 - F32(look["centre_dark"]) * _CORE_DARK(core))[..., None]
    for colour, coverage in look["blotches"]:
        patch = _region(_noise(rng, crop, 0.2 * unit, octaves=3), ins, coverage, 0.12)
        body = _mix(body, colour, F32(rng.uniform(0.5, 0.8)) * patch)
    if look["network"] > 0.02 or look["peripheral_network"] > 0.02:
        # Pigment network: the ridges of band-limited noise look like a mesh of dark lines.
        ridge = np.square(np.square(1 - np.abs(2 * _noise(rng, crop, 0.07 * unit) - 1)))  # ** 4, exact
        strength = F32(look["network"]) + F32(look["peripheral_network"]) * _smoothstep(0.3, 0.8, rh)
        body *= (1 - strength * ridge)[..., None]
    if look["cerebriform"] > 0.02:
        # Seborrhoeic keratosis: gyri and sulci, a waxy pattern of light ridges and dark furrows.
        gyri = 1 - np.abs(2 * _noise(rng, crop, 0.12 * unit, octaves=2) - 1)
        body *= (1 + F32(look["cerebriform"]) * (gyri - F32(0.6)))[..., None]
    if look["lacunae"] > 0.05:
        # Vascular lesion: red and purple lacunae separated by pale septa.
        depth = _noise(rng, crop, 0.045 * unit)
        lac = _smoothstep(0.3, 0.45, depth)
        red = _smoothstep(0.35, 0.65, _noise(rng, crop, 0.3 * unit))
        lac_colour = _mix(np.broadcast_to(F32([92, 28, 72]), (*crop, 3)), (150, 22, 48), red)
        lac_colour = lac_colour * (F32(1.2) - F32(0.45) * depth)[..., None]  # deeper = darker
        lac_img = _mix(np.broadcast_to(F32([222, 164, 172]), (*crop, 3)), lac_colour, lac)
        body = _mix(body, lac_img, np.full(crop, look["lacunae"], dtype=F32))
    if look["scale"] > 0.02:
        flakes = _region(_noise(rng, crop, 0.1 * unit, octaves=3), ins, look["scale"], 0.12)
        body = _mix(body, (236, 226, 206), F32(rng.uniform(0.4, 0.65)) * flakes)
    if look["white_centre"] > 0.02:
        scar = 1 - _smoothstep(0.25, 0.6, rh + F32(0.25) * (_noise(rng, crop, 0.1 * unit) - 0.5))
        body = _mix(body, (238, 224, 220), F32(look["white_centre"]) * scar)

    def _dots(n: float, size_u: tuple[float, float], spread: float):
        def draw(d: ImageDraw.ImageDraw) -> None:
            for _ in range(int(round(n))):
                a, rr = float(rng.uniform(0, 2 * np.pi)), look["radius"] * spread * math.sqrt(rng.random())
                sin_a, cos_a = _sc(a)
                px = (cx + rr * cos_a) * unit + wc / 2
                py = (cy + rr * sin_a) * unit + hc / 2
                s = max(0.6, rng.uniform(*size_u) * unit)
                d.ellipse((px - s, py - s, px + s, py + s), fill=int(rng.uniform(160, 255)))

        return draw

    if look["dots"] >= 1:  # globules and dots
        dots = _marks(shape, _dots(look["dots"], (0.012, 0.035), 1.0), 0.5)[box] * ins
        body = _mix(body, look["dot_colour"], F32(0.9) * dots)
    if look["milia"] >= 1:  # milia-like cysts, follicle openings
        size = (0.006, 0.014) if look["milia"] > 15 else (0.01, 0.025)  # follicles vs. cysts
        milia = _marks(shape, _dots(look["milia"], size, 0.9), 0.4)[box] * ins
        body = _mix(body, (242, 236, 222), F32(0.85) * milia)
    if look["vessels"] >= 1:

        def vessels(d: ImageDraw.ImageDraw) -> None:  # arborising: branching, tapering red lines
            for _ in range(int(round(look["vessels"]))):
                a, rr = float(rng.uniform(0, 2 * np.pi)), look["radius"] * 0.8 * math.sqrt(rng.random())
                sin_a, cos_a = _sc(a)
                px, py = (cx + rr * cos_a) * unit + wc / 2, (cy + rr * sin_a) * unit + hc / 2
                stack = [(px, py, float(rng.uniform(0, 2 * np.pi)), 3)]
                while stack:
                    px, py, heading, depth = stack.pop()
                    pts = [(px, py)]
                    for _ in range(int(rng.integers(3, 7))):
                        heading += float(rng.normal(0, 0.35))
                        sin_h, cos_h = _sc(heading)
                        px, py = px + cos_h * 0.05 * unit, py + sin_h * 0.05 * unit
                        pts.append((px, py))
                    d.line(pts, fill=int(60 + 60 * depth), width=max(1, round(unit / 60 * depth / 2)))
                    for turn in (-0.6, 0.6):
                        if depth > 1 and rng.random() < 0.7:
                            stack.append((px, py, heading + turn + float(rng.normal(0, 0.2)), depth - 1))

        vessel_mask = _marks(shape, vessels, 0.45)[box] * _smoothstep(0, 0.3, ins)
        body = _mix(body, (178, 28, 44), F32(0.95) * vessel_mask)

    # ---- composite: erythema halo around, the lesion over the skin, hairs over everything
    img = skin
    if look["halo"] > 0.02:
        halo = F32(look["halo"]) * _FADE(rho - 1) * (1 - inside)
        img = _mix(skin, (214, 110, 112), halo)
    img[box] = _mix(img[box], body, np.clip(ins * F32(look["opacity"]), 0, 1))
    if rng.random() < 0.4:

        def hairs(d: ImageDraw.ImageDraw) -> None:
            for _ in range(int(rng.integers(1, 10))):
                px, py = rng.uniform(0, wc), rng.uniform(0, hc)
                heading, bend = float(rng.uniform(0, 2 * np.pi)), float(rng.normal(0, 0.08))
                pts = []
                for _ in range(int(rng.integers(8, 30))):
                    pts.append((px, py))
                    heading += bend
                    sin_h, cos_h = _sc(heading)
                    px, py = px + cos_h * 0.08 * unit, py + sin_h * 0.08 * unit
                d.line(pts, fill=int(rng.uniform(150, 255)), width=max(1, round(unit / rng.uniform(40, 75))))

        hair_colour = F32(rng.uniform(25, 70)) * F32([1.0, 0.8, 0.7])
        img = _mix(img, hair_colour, _marks(shape, hairs, 0.5))
    camera = _Camera(
        vignette=float(rng.uniform(0.1, 0.5)),
        ring=float(rng.uniform(0.8, 0.98)) if rng.random() < 0.2 else 0.0,
        gains=tuple(float(g) for g in rng.uniform(0.95, 1.05, 3)),
    )
    canvas = Image.fromarray(np.clip(img + F32(0.5), 0, 255).astype(np.uint8), "RGB")
    # Optics: the dermatoscope's lens never draws a perfectly sharp edge.
    return canvas.filter(ImageFilter.BoxBlur(0.4 * unit / 75)), camera


def _on_device(camera: _Camera, profile: DeviceProfile) -> _Camera:
    """The lesion's camera as the profile's device sees it (the default profile: unchanged)."""
    return _Camera(
        vignette=min(max(camera.vignette + profile.vignette, 0.0), 0.9),
        ring=camera.ring,
        gains=(
            camera.gains[0] * profile.gains[0],
            camera.gains[1] * profile.gains[1],
            camera.gains[2] * profile.gains[2],
        ),
    )


def _shade(camera: _Camera, width: int, height: int) -> np.ndarray:
    """The dermatoscope's fall-off (and black ring): fixed to the camera, not the skin."""
    xs = np.arange(width, dtype=F32) + F32(0.5 - width / 2)
    ys = np.arange(height, dtype=F32) + F32(0.5 - height / 2)
    rr = _hypot(xs[None, :], ys[:, None]) * F32(2 / math.sqrt(width * width + height * height))
    shade = 1 - F32(camera.vignette) * (rr * rr * np.sqrt(rr))  # rr ** 2.5, exact
    if camera.ring > 0:
        shade *= 1 - _smoothstep(camera.ring - 0.03, camera.ring + 0.03, rr)
    return shade[..., None]


def take_shot(
    canvas: Image.Image,
    camera: _Camera,
    shade: np.ndarray,
    rng: np.random.Generator,
    noise_rng: np.random.Generator,
    width: int,
    height: int,
    copy: int = 0,
    profile: DeviceProfile = PROFILES["default"],
) -> np.ndarray:
    """One photograph: a slightly moved, turned and zoomed view, re-lit, with sensor noise.

    ``rng`` draws the pose and light (the photograph), ``noise_rng`` the sensor noise (the file):
    a re-export (``copy`` > 0) keeps the photograph and changes the file.
    """
    angle = float(rng.normal(0, math.radians(3.0)))
    zoom = float(rng.uniform(0.96, 1.04))
    sx, sy = float(rng.normal(0, 0.02)) * width, float(rng.normal(0, 0.02)) * height
    sin_a, cos_a = _sc(angle)
    c, s = cos_a / zoom, sin_a / zoom
    ox, oy = width / 2 + sx, height / 2 + sy
    wc, hc = canvas.size
    affine = (c, -s, wc / 2 - c * ox + s * oy, s, c, hc / 2 - s * ox - c * oy)
    view = canvas.transform((width, height), Image.AFFINE, affine, resample=Image.BILINEAR)
    # Light and white balance change between shots: a per-channel gain and gamma, as a lookup.
    gains = np.array(camera.gains) * rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, 3)
    if copy:  # another export of the same photograph: a touch of colour management
        gains *= noise_rng.uniform(0.985, 1.015, 3)
    levels = _pow(np.arange(256) / 255.0, rng.uniform(0.93, 1.07) * profile.gamma) * 255.0
    lut = np.clip(levels[None, :] * gains[:, None] + 0.5, 0, 255).astype(int)  # (3, 256)
    img = np.asarray(view.point(lut.ravel().tolist()), dtype=F32) * shade
    # Sensor noise, mostly luminance once demosaiced: one plane for all three channels.
    noise = noise_rng.standard_normal((height, width, 1), dtype=F32)
    img += noise * F32(noise_rng.uniform(1.0, 2.5) * profile.noise)
    return np.clip(img + F32(0.5), 0, 255).astype(np.uint8)


def render_lesion(
    plan: LesionPlan, seed: int, width: int, height: int, profile: str = "default"
) -> list[np.ndarray]:
    """Every photograph of one physical lesion, as (height, width, 3) uint8 arrays.

    ``profile`` (a key of :data:`PROFILES`) is the device: for the same plan and seed, the lesion
    and the pose of every shot are the same under every profile, only the light, optics, sensor
    and export differ. (``generate`` passes each clinic's own seed: its own patients.)"""
    device = PROFILES[profile]
    canvas, camera = draw_canvas(plan.dx, plan.look, plan.blend, _seq(seed, 1, plan.index), width, height)
    camera = _on_device(camera, device)
    shade = _shade(camera, width, height)
    return [
        take_shot(
            canvas,
            camera,
            shade,
            _seq(seed, 2, plan.index, shot.view),
            _seq(seed, 3, plan.index, shot.view, shot.copy),
            width,
            height,
            shot.copy,
            device,
        )
        for shot in plan.shots
    ]


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _render_chunk(job: tuple[list[LesionPlan], int, int, int, int, str, str]) -> int:
    """Worker: draw and write every photograph of a chunk of lesions; returns the image count."""
    plans, seed, width, height, quality, profile, img_dir = job
    n = 0
    for plan in plans:
        for shot, pixels in zip(plan.shots, render_lesion(plan, seed, width, height, profile), strict=True):
            (Path(img_dir) / f"{shot.image_id}.jpg").write_bytes(_jpeg(pixels, quality))
            n += 1
    return n


# --------------------------------------------------------------------------- the stage


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
        _seq(clinic_seed(params.profile, seed), 0),
        FIRST_IMAGE_NUMBER + block,
        block,
    )


def clinic_seed(profile: str, seed: int) -> int:
    """The seed of the profile's patients (``seed`` itself for the default profile)."""
    return seed + PROFILES[profile].clinic * CLINIC_SEED_STRIDE


def _chunks(plans: list[LesionPlan], images_per_chunk: int) -> list[list[LesionPlan]]:
    chunks: list[list[LesionPlan]] = [[]]
    n = 0
    for plan in plans:
        if n >= images_per_chunk:
            chunks.append([])
            n = 0
        chunks[-1].append(plan)
        n += len(plan.shots)
    return [c for c in chunks if c]


def generate(params: SyntheticParams, seed: int, out_dir: Path, *, workers: int = 0) -> SyntheticResult:
    """Write ``out_dir/metadata.csv`` and ``out_dir/images/<image_id>.jpg`` (``out_dir``: empty).

    Byte-identical for the same params and seed, whatever ``workers`` (0 = all cores).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise StageError(f"{out_dir}: output folder does not exist")
    if any(out_dir.iterdir()):
        raise StageError(f"{out_dir}: output folder is not empty")
    plans = plan_dataset(params, seed)
    rows = [
        {"lesion_id": shot.lesion_id, "image_id": shot.image_id, "dx": p.dx, **p.meta}
        for p in plans
        for shot in p.shots
    ]
    # Sorted by the (random) ids, lesion by lesion like HAM's file; row order reveals no class.
    rows.sort(key=lambda r: (r["lesion_id"], r["image_id"]))
    with open(out_dir / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=HAM_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)

    img_dir = out_dir / "images"
    img_dir.mkdir()
    n_proc = n_workers(workers)
    quality = min(params.jpeg_quality, PROFILES[params.profile].max_jpeg_quality)
    # Chunks of ~32 images: large enough to amortise process hand-off, small enough to balance.
    jobs = [
        (
            c,
            clinic_seed(params.profile, seed),
            params.width,
            params.height,
            quality,
            params.profile,
            str(img_dir),
        )
        for c in _chunks(plans, 32)
    ]
    with tqdm(total=len(rows), desc="draw synthetic images", unit="img") as bar:
        if n_proc == 1 or len(jobs) == 1:
            for job in jobs:
                bar.update(_render_chunk(job))
        else:
            with ProcessPoolExecutor(min(n_proc, len(jobs))) as pool:
                for n in pool.map(_render_chunk, jobs):
                    bar.update(n)

    counts = {c: sum(1 for r in rows if r["dx"] == c) for c in CLASSES}
    n_lesions = len({r["lesion_id"] for r in rows})
    n_dup = sum(len({shot.lesion_id for shot in p.shots}) - 1 for p in plans)
    log.info(
        "synthetic (profile %s): %d images of %d lesion_ids (%d catalogued twice), per class %s",
        params.profile, len(rows), n_lesions, n_dup, counts,
    )  # fmt: skip
    return SyntheticResult(len(rows), n_lesions, counts, n_dup)


def _looks_like_ours(folder: Path) -> bool:
    return {p.name for p in folder.iterdir()} <= {"metadata.csv", "images"}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m skinlesion.sources.synthetic",
        description="Draw a synthetic HAM10000-layout folder (metadata.csv + images/<image_id>.jpg), "
        "e.g. to try download.source=local:PATH. The pipeline's download stage calls the same code "
        "with params.yaml's download.synthetic section and base.seed.",
    )
    ap.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder to write; replaced atomically if it holds an earlier synthetic set",
    )
    ap.add_argument("--params", type=Path, help="take download.synthetic and base.seed from this params.yaml")
    ap.add_argument("--n-images", type=int, help="number of images (default: params, else 700)")
    ap.add_argument("--seed", type=int, help="random seed (default: params' base.seed, else 42)")
    ap.add_argument("--width", type=int, help="image width in pixels (default 200)")
    ap.add_argument("--height", type=int, help="image height in pixels (default 150)")
    ap.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        help="the device that photographs the set: "
        + "; ".join(f"{p.name} ({p.description})" for p in PROFILES.values())
        + ". Another clinic draws other lesions (same classes and looks), with image_ids and "
        "lesion_ids of its own. Default: params' download.synthetic.profile, else default",
    )
    ap.add_argument("--workers", type=int, default=0, help="worker processes (0 = all cores)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)  # fmt: skip
    setup_logging(args.verbose)

    def body() -> int:
        params = (
            load_sections(args.params, base=BaseParams, download=DownloadParams)
            if args.params
            else Sections(base=BaseParams(), download=DownloadParams())
        )
        overrides = {
            "n_images": args.n_images,
            "width": args.width,
            "height": args.height,
            "profile": args.profile,
        }
        raw = {k: getattr(params.download.synthetic, k) for k in SyntheticParams.__dataclass_fields__}
        raw.update({k: v for k, v in overrides.items() if v is not None})
        synthetic = build_section(SyntheticParams, raw, "download.synthetic.")
        seed = params.base.seed if args.seed is None else args.seed
        if args.out.exists() and not (args.out.is_dir() and _looks_like_ours(args.out)):
            raise StageError(f"{args.out}: exists and is not a synthetic data set; choose a new folder")
        with atomic_dir(args.out) as tmp:
            res = generate(synthetic, seed, tmp, workers=args.workers)
        log.info("wrote %s: %d images, %d lesion_ids", args.out, res.n_images, res.n_lesions)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
