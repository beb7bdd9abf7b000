"""Platform-exact maths: sin, cos, exp, log, power and arctan2 with the same bits on every CPU.

The same seed draws the same bytes on every machine, not only on the one that made dvc.lock.
numpy hands sin, cos, exp, log, arctan2, hypot and power (float32 and float64) to SIMD kernels it
picks at run time by CPU (AVX-512, AVX2, SSE, NEON), and their last bits differ; libm's (math.sin,
math.exp, a float's **) differ between its FMA and non-FMA builds. One such bit can move a value
across a rounding step, a border-table index or a mask edge, and so change a JPEG. So the
drawing calls none of them: the functions below use only + - * /, sqrt, rint, frexp, ldexp,
abs, min/max and where, in a fixed order, on float64 numbers or Python floats. IEEE 754 rounds
each of those exactly, on every CPU and in every SIMD width, and numpy never fuses two ufuncs
into one FMA. Accuracy ~1e-15, far below what a pixel sees; exactness is the point.
(numpy's random streams are integer algorithms; the few libm calls inside its normal sampler
only decide rare rejections and tails, where a last-bit difference has odds ~1e-15 to matter.)

The synthetic generator (:mod:`skinlesion.sources.synthetic_draw`) draws with these only;
tests/unit/sources/test_synthetic_platform.py checks its source and this one for any CPU-dependent call.
"""

from __future__ import annotations

import math

import numpy as np

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


def poly(z, coefs: tuple[float, ...]):
    """coefs[0] + coefs[1] z + ... by Horner: one fixed order of operations."""
    acc = coefs[-1]
    for c in coefs[-2::-1]:
        acc = acc * z + c
    return acc


def _sincos_reduced(r):
    """sin and cos of ``r`` in [-pi/4, pi/4] (a float or a float64 array)."""
    z = r * r
    return r + r * z * poly(z, _SIN), 1.0 - 0.5 * z + z * z * poly(z, _COS)


def sincos(x):
    """(sin, cos) of ``x`` (float64 array, |x| < 1e5): platform-exact."""
    x = np.asarray(x, dtype=np.float64)
    k = np.rint(x * (2 / math.pi))
    s, c = _sincos_reduced((x - k * _PIO2_HI) - k * _PIO2_LO)
    q = k.astype(np.int64) & 3  # which quarter turn: x = r + q pi/2
    return np.choose(q, (s, c, -s, -c)), np.choose(q, (c, -s, -c, s))


def sincos_float(x: float) -> tuple[float, float]:
    """(sin, cos) of one float, as :func:`sincos` computes it, ~30 times faster in pure Python."""
    k = round(x * (2 / math.pi))
    s, c = _sincos_reduced((x - k * _PIO2_HI) - k * _PIO2_LO)
    return ((s, c), (c, -s), (-s, -c), (-c, s))[k & 3]


def exp(x):
    """exp of ``x`` (float64 array), clipped to [-700, 700]: platform-exact."""
    x = np.clip(np.asarray(x, dtype=np.float64), -700.0, 700.0)
    k = np.rint(x * 1.4426950408889634)  # 1 / ln 2, a literal: libm must not pick k
    return np.ldexp(poly((x - k * _LN2_HI) - k * _LN2_LO, _EXP), k.astype(np.int32))


def log(x):
    """Natural log of ``x`` (float64 array, x > 0): platform-exact."""
    m, e = np.frexp(np.asarray(x, dtype=np.float64))  # x = m 2**e, m in [0.5, 1): exact
    small = m < _SQRT_HALF
    m, e = np.where(small, m * 2, m), (e - small).astype(np.float64)
    f = (m - 1) / (m + 1)
    return e * _LN2_HI + (e * _LN2_LO + 2 * f * poly(f * f, _ATANH))


def power(x, p: float):
    """``x ** p`` for x >= 0 (float64 array; 0 ** p = 0): platform-exact."""
    x = np.asarray(x, dtype=np.float64)
    pos = x > 0
    return np.where(pos, exp(p * log(np.where(pos, x, 1.0))), 0.0)


def atan2(y, x):
    """arctan2 (float64 arrays, result in [-pi, pi]): platform-exact."""
    y, x = np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)
    ay, ax = np.abs(y), np.abs(x)
    big, small = np.maximum(ay, ax), np.minimum(ay, ax)
    a = small / np.where(big > 0, big, 1.0)  # tan of the angle to the nearer axis, [0, 1]
    far = a > _TAN_PI_8
    z = np.where(far, (a - 1) / (a + 1), a)  # atan(a) = pi/4 + atan(z) above tan(pi/8)
    z2 = z * z
    w = z2 * z2
    t = z - z * (z2 * poly(w, _ATAN[0::2]) + w * poly(w, _ATAN[1::2]))
    t = np.where(far, math.pi / 4 + t, t)
    t = np.where(ay > ax, math.pi / 2 - t, t)
    t = np.where(x < 0, math.pi - t, t)
    return np.where(y < 0, -t, t)


def hypot(x, y):
    """sqrt(x^2 + y^2): sqrt is exactly rounded everywhere, np.hypot (libm) is not."""
    return np.sqrt(x * x + y * y)


def diamond_angle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The diamond angle of (u, v): in [0, 4), monotone in the true angle (0 = +u axis, 1 = +v).
    One division instead of an arctan2: exact float32 arithmetic, and fast on a whole canvas."""
    s = np.abs(u) + np.abs(v)
    t = v / np.where(s > 0, s, np.float32(1))
    p = np.where(u >= 0, t, 2 - t)
    return np.where(p < 0, p + 4, p)


def diamond_bin_angles(n: int) -> np.ndarray:
    """The true angle (radians, float64) at the centre of each of ``n`` equal diamond-angle bins."""
    p = (np.arange(n) + 0.5) * (4 / n)
    t = np.where(p < 1, p, np.where(p < 3, 2 - p, p - 4))  # v on the unit diamond |u| + |v| = 1
    return atan2(t, np.where((p < 1) | (p >= 3), 1 - np.abs(t), np.abs(t) - 1))


class LinearTable:
    """``f`` on [lo, hi], sampled at n + 1 points and read back by linear interpolation: float32
    arithmetic, exact on every CPU like ``f`` itself, and ~10x cheaper per pixel than evaluating it.
    Inputs are clipped to [lo, hi]."""

    def __init__(self, f, lo: float, hi: float, n: int) -> None:
        self.lo, self.scale, self.n = np.float32(lo), np.float32(n / (hi - lo)), n
        v = f(np.linspace(lo, hi, n + 1)).astype(np.float32)
        self.v, self.dv = v, np.append(np.diff(v), np.float32(0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = np.clip((x - self.lo) * self.scale, 0, self.n)
        i = np.floor(t)
        k = i.astype(np.intp)
        return self.v[k] + self.dv[k] * (t - i)
