"""Drawing the synthetic set: each physical lesion on its skin, and each photograph of it.

A lesion's look (size, shape, border, colours, structures) follows its class, or is blended with
a look-alike class; skin tone and texture, hairs, the dermatoscope's vignette or black ring, the
device profile's light and sensor. Every float step is exact on every CPU (see the comment below
and :mod:`skinlesion.sources.exactmath`), so a seed draws the same bytes everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from skinlesion.sources import exactmath as exact
from skinlesion.sources.synthetic_catalogue import PROFILES, DeviceProfile, LesionPlan, rng_stream

# --------------------------------------------------------------------------- drawing helpers
# Lengths are in "units" of half the output image height, so the look does not depend on the
# resolution. A physical lesion is drawn once on a canvas larger than the photograph; each
# photograph is an affine view of that canvas, so re-shots show the same lesion, skin and hairs.
# Exact on every x86 CPU: the numpy steps are elementwise IEEE arithmetic (float32 or float64) or
# the functions of exactmath.py, never a SIMD transcendental, a BLAS call or a float sum; the Pillow
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
    c = np.asarray(colour, float) * exact.exp(rng.normal(0, spread) * np.array([0.8, 1.0, 1.15]))
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
_HARMONIC_FALLOFF = {k: float(exact.power(float(k), 0.6)) for k in range(3, 10)}


_BORDER_ANGLES = exact.diamond_bin_angles(BORDER_TABLE)


_FADE = exact.LinearTable(lambda d: exact.exp(-2.5 * d), 0.0, 16.0, 4096)  # the erythema halo's fall-off
_CORE_DARK = exact.LinearTable(lambda c: exact.power(c, 0.7), 0.0, 1.0, 4096)  # how the centre darkens


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
    sin_a, cos_a = exact.sincos_float(float(rng.uniform(0, np.pi)))
    dxr, dyr = (x - F32(cx))[None, :], (y - F32(cy))[:, None]
    u = (dxr * F32(cos_a) + dyr * F32(sin_a)) * F32(1 / look["aspect"])
    v = dyr * F32(cos_a) - dxr * F32(sin_a)
    border = np.ones(BORDER_TABLE)
    for k in range(1, 10):
        amp = (look["asym"] if k <= 2 else look["irregular"] / _HARMONIC_FALLOFF[k]) * rng.normal(0, 1)
        border += amp * exact.sincos(k * _BORDER_ANGLES + rng.uniform(0, 2 * np.pi))[1]
    radius_table = (look["radius"] * np.maximum(border, 0.35)).astype(F32)
    idx = (exact.diamond_angle(u, v) * F32(BORDER_TABLE / 4)).astype(np.int32) % BORDER_TABLE
    rho = exact.hypot(u, v) / radius_table[idx]
    rho += F32(2 * look["border_noise"]) * (_noise(rng, shape, 0.15 * unit, octaves=2) - 0.5)
    if look["lobe"] > 0.05:
        la = float(rng.uniform(0, 2 * np.pi))
        lr = look["radius"] * rng.uniform(0.35, 0.6)
        lx, ly = (
            cx + exact.sincos_float(la)[1] * look["radius"] * 0.9,
            cy + exact.sincos_float(la)[0] * look["radius"] * 0.9,
        )
        lobe = exact.hypot((x - F32(lx))[None, :], (y - F32(ly))[:, None]) * F32(1 / lr)
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
                sin_a, cos_a = exact.sincos_float(a)
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
                sin_a, cos_a = exact.sincos_float(a)
                px, py = (cx + rr * cos_a) * unit + wc / 2, (cy + rr * sin_a) * unit + hc / 2
                stack = [(px, py, float(rng.uniform(0, 2 * np.pi)), 3)]
                while stack:
                    px, py, heading, depth = stack.pop()
                    pts = [(px, py)]
                    for _ in range(int(rng.integers(3, 7))):
                        heading += float(rng.normal(0, 0.35))
                        sin_h, cos_h = exact.sincos_float(heading)
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
                    sin_h, cos_h = exact.sincos_float(heading)
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
    rr = exact.hypot(xs[None, :], ys[:, None]) * F32(2 / math.sqrt(width * width + height * height))
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
    sin_a, cos_a = exact.sincos_float(angle)
    c, s = cos_a / zoom, sin_a / zoom
    ox, oy = width / 2 + sx, height / 2 + sy
    wc, hc = canvas.size
    affine = (c, -s, wc / 2 - c * ox + s * oy, s, c, hc / 2 - s * ox - c * oy)
    view = canvas.transform((width, height), Image.AFFINE, affine, resample=Image.BILINEAR)
    # Light and white balance change between shots: a per-channel gain and gamma, as a lookup.
    gains = np.array(camera.gains) * rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, 3)
    if copy:  # another export of the same photograph: a touch of colour management
        gains *= noise_rng.uniform(0.985, 1.015, 3)
    levels = exact.power(np.arange(256) / 255.0, rng.uniform(0.93, 1.07) * profile.gamma) * 255.0
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
    canvas, camera = draw_canvas(
        plan.dx, plan.look, plan.blend, rng_stream(seed, 1, plan.index), width, height
    )
    camera = _on_device(camera, device)
    shade = _shade(camera, width, height)
    return [
        take_shot(
            canvas,
            camera,
            shade,
            rng_stream(seed, 2, plan.index, shot.view),
            rng_stream(seed, 3, plan.index, shot.view, shot.copy),
            width,
            height,
            shot.copy,
            device,
        )
        for shot in plan.shots
    ]
