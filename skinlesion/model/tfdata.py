"""The one TFRecord format of the project: written by the prepare stage, read by train/evaluate.

Layout of a prepared folder (``data/prepared/``)::

    manifest.json                         image_size, aspect, classes, sexes, localizations,
                                          per split: n, class_counts, shards, csv
    <split>-<k:05d>-of-<n:05d>.tfrecord   k = 0..n-1, for split in train, val, test
    <split>.csv                           image_id,lesion_id,dx,label,age,sex,localization,
                                          one row per record, in shard order

Every record is a serialized ``tf.train.Example`` with these features (:data:`FEATURES`):

============  =========  ===========================================================
feature       kind       value
============  =========  ===========================================================
image         bytes      raw uint8 pixels, row-major ``[S, S, 3]`` RGB
                         (``tf.io.decode_raw(x, tf.uint8)`` then reshape; S = manifest
                         ``image_size``)
label         int64      index into ``manifest["classes"]`` (:data:`skinlesion.core.schema.CLASSES`)
image_id      bytes      UTF-8, e.g. ``ISIC_0024306``
lesion_id     bytes      UTF-8, e.g. ``HAM_0000118``
age           float      years; NaN when unknown
sex           int64      index into ``manifest["sexes"]`` (:data:`skinlesion.core.schema.SEXES`)
localization  int64      index into ``manifest["localizations"]``
============  =========  ===========================================================

Writing needs no TensorFlow: the Example protobuf and the TFRecord framing (length, masked
CRC-32C of the length, data, masked CRC-32C of the data) are encoded here with numpy, so the
prepare stage's image workers stay light (importing TensorFlow costs ~4 s and ~650 MB per
process on the CI machine) and compute the checksums in parallel. Reading uses tf.data, which
verifies every checksum. TensorFlow is imported only inside the reader functions.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skinlesion.core.errors import StageError

__all__ = [
    "FEATURES",
    "FORMAT_VERSION",
    "MANIFEST",
    "SplitArrays",
    "crc32c",
    "crc32c_many",
    "encode_example",
    "frame_records",
    "load_manifest",
    "read_split",
    "read_split_numpy",
    "shard_name",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# feature name -> kind; the order is the order of the fields in every serialized record.
FEATURES: dict[str, str] = {
    "image": "bytes",
    "label": "int64",
    "image_id": "bytes",
    "lesion_id": "bytes",
    "age": "float",
    "sex": "int64",
    "localization": "int64",
}


def shard_name(split: str, k: int, n: int) -> str:
    return f"{split}-{k:05d}-of-{n:05d}.tfrecord"


# --------------------------------------------------------------------------- CRC-32C

_CRC_POLY = 0x82F63B78  # Castagnoli, reflected
_MASK_DELTA = 0xA282EAD8


@functools.cache
def _crc_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_CRC_POLY), t >> 1).astype(np.uint32)
    return t


@functools.cache
def _crc_table16() -> np.ndarray:
    """Register update for two bytes at once: 64K entries (256 KB, stays in cache)."""
    table = _crc_table()
    reg = np.arange(1 << 16, dtype=np.uint32)
    for _ in range(2):
        reg = table[reg & 0xFF] ^ (reg >> 8)
    return reg


def _apply(op: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Apply a linear map on CRC registers given as 4 byte-indexed tables (see below)."""
    return op[0][reg & 0xFF] ^ op[1][(reg >> 8) & 0xFF] ^ op[2][(reg >> 16) & 0xFF] ^ op[3][reg >> 24]


@functools.cache
def _zeros_operator(n: int) -> np.ndarray:
    """The linear map 'feed n zero bytes' on the CRC register, as 4 byte-indexed tables.

    Built by squaring (feeding 2k zeros = feeding k zeros twice), so large n stay cheap.
    """
    if n % 2 == 0 and n > 0:
        half = _zeros_operator(n // 2)
        return _apply(half, half)
    table = _crc_table()
    reg = (np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32))[:, None]).ravel()
    for _ in range(n):
        reg = table[reg & 0xFF] ^ (reg >> 8)
    return reg.reshape(4, 256)


def crc32c_many(messages: list[bytes]) -> np.ndarray:
    """CRC-32C of each message (each at least 4 bytes long), vectorised with numpy.

    A byte-at-a-time table CRC in Python runs at a few MB/s, far too slow for image records.
    The CRC is linear over GF(2), which allows working on many bytes at once: every message is
    left-padded with zeros to a common length (leading zeros do not change a CRC whose register
    starts at 0; the standard initial value ~0 is folded in by complementing the first four
    bytes) and cut into ``lanes`` equal segments whose registers advance together, two bytes
    per numpy step; neighbouring segments are then merged pairwise (shift the left register
    past the right segment's length with the 'feed zeros' operator, xor), log2(lanes) rounds.
    """
    if not messages:
        return np.zeros(0, dtype=np.uint32)
    lengths = [len(m) for m in messages]
    if min(lengths) < 4:
        raise ValueError("crc32c_many needs messages of at least 4 bytes")
    longest = max(lengths)
    lanes = 1 << int(math.log2(max(1.0, math.sqrt(longest / 4))))  # a power of two
    seg = -(-longest // lanes)
    seg += seg % 2  # whole 16-bit words per segment
    total = lanes * seg
    buf = np.zeros((len(messages), total), dtype=np.uint8)
    for i, m in enumerate(messages):
        start = total - len(m)
        buf[i, start:] = np.frombuffer(m, dtype=np.uint8)
        buf[i, start : start + 4] ^= 0xFF
    # words[j] = the j-th little-endian 16-bit word of every lane of every message
    words = np.ascontiguousarray(buf.view("<u2").reshape(len(messages) * lanes, seg // 2).T)
    table16 = _crc_table16()
    reg = np.zeros(words.shape[1], dtype=np.uint32)
    low = reg.view(np.uint16)[0 if sys.byteorder == "little" else 1 :: 2]  # low half, in place
    index = np.empty(words.shape[1], dtype=np.uint16)
    update = np.empty_like(reg)
    for w in words:  # reg = table16[(reg ^ w) & 0xFFFF] ^ (reg >> 16), without temporaries
        np.bitwise_xor(low, w, out=index)
        np.take(table16, index, out=update)
        np.right_shift(reg, 16, out=reg)
        np.bitwise_xor(reg, update, out=reg)
    reg = reg.reshape(len(messages), lanes)
    length = seg
    while reg.shape[1] > 1:
        reg = _apply(_zeros_operator(length), reg[:, 0::2]) ^ reg[:, 1::2]
        length *= 2
    return reg[:, 0] ^ np.uint32(0xFFFFFFFF)


def crc32c(message: bytes) -> int:
    return int(crc32c_many([message])[0])


def _masked(crcs: np.ndarray) -> np.ndarray:
    crcs = crcs.astype(np.uint64)
    return (((crcs >> 15) | (crcs << 17)) + _MASK_DELTA).astype(np.uint32)


def frame_records(payloads: list[bytes]) -> list[bytes]:
    """TFRecord framing: uint64 length, masked crc32c(length), data, masked crc32c(data)."""
    heads = [struct.pack("<Q", len(p)) for p in payloads]
    head_crc = _masked(crc32c_many(heads))
    data_crc = _masked(crc32c_many(payloads))
    return [
        b"".join((h, struct.pack("<I", hc), p, struct.pack("<I", dc)))
        for h, hc, p, dc in zip(heads, head_crc.tolist(), payloads, data_crc.tolist(), strict=True)
    ]


# --------------------------------------------------------------------------- tf.train.Example


_ONE_BYTE_VARINTS = [bytes((i,)) for i in range(128)]


def _varint(n: int) -> bytes:
    if 0 <= n < 128:
        return _ONE_BYTE_VARINTS[n]  # nearly every key and length: skip the loop
    if n < 0:
        n += 1 << 64  # int64 two's complement, as protobuf encodes negative int64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(kind: str, value: Any) -> bytes:
    # Feature { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
    #                        Int64List int64_list = 3; } }, each list's values in field 1.
    if kind == "bytes":
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        return _field(1, _field(1, data))
    if kind == "float":
        return _field(2, _field(1, struct.pack("<f", value)))  # packed repeated float
    if kind == "int64":
        return _field(3, _field(1, _varint(int(value))))  # packed repeated int64
    raise ValueError(f"unknown feature kind {kind!r}")


def encode_example(values: dict[str, Any]) -> bytes:
    """Serialize one record (a ``tf.train.Example``) from a dict with every key of FEATURES.

    Fields are written in :data:`FEATURES` order, so equal inputs give equal bytes.
    """
    missing = set(FEATURES) - set(values)
    if missing:
        raise ValueError(f"encode_example: missing features {sorted(missing)}")
    # Example { Features features = 1; }  Features { map<string, Feature> feature = 1; }
    entries = b"".join(
        _field(1, _field(1, name.encode()) + _field(2, _feature(kind, values[name])))
        for name, kind in FEATURES.items()
    )
    return _field(1, entries)


# --------------------------------------------------------------------------- reading


def load_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    """Read and check ``manifest.json`` of a prepared folder."""
    path = Path(prepared_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path}: not found; run the prepare stage first") from None
    except json.JSONDecodeError as e:
        raise StageError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StageError(
            f"{path}: format_version {manifest.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}; rerun the prepare stage"
        )
    return manifest


def _split_files(prepared_dir: Path, split: str, manifest: dict[str, Any]) -> list[str]:
    splits = manifest["splits"]
    if split not in splits:
        raise StageError(f"{prepared_dir / MANIFEST}: no split {split!r}; have {sorted(splits)}")
    files = [prepared_dir / name for name in splits[split]["shards"]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise StageError(f"{prepared_dir}: missing shard(s) {missing[:3]} of split {split!r}")
    return [str(f) for f in files]


def read_split(prepared_dir: str | Path, split: str, *, with_meta: bool = False, ordered: bool = True) -> Any:
    """A ``tf.data.Dataset`` of one split: ``(image, label)`` or ``(features, label)``.

    ``image`` is uint8 ``[S, S, 3]``, ``label`` int32. With ``with_meta`` the first element is
    ``{"image", "age" (float32, NaN = unknown), "sex" (int32), "localization" (int32)}``.
    ``ordered=True`` yields records in shard order (= ``<split>.csv`` order), parsing in
    parallel; ``ordered=False`` also reads the shards in parallel (interleaved, for training,
    which shuffles anyway). Not batched, not shuffled, not cached: the caller decides.
    """
    import tensorflow as tf

    prepared_dir = Path(prepared_dir)
    manifest = load_manifest(prepared_dir)
    files = _split_files(prepared_dir, split, manifest)
    size = int(manifest["image_size"])
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "age": tf.io.FixedLenFeature([], tf.float32),
        "sex": tf.io.FixedLenFeature([], tf.int64),
        "localization": tf.io.FixedLenFeature([], tf.int64),
    }

    def parse(record: Any) -> Any:
        ex = tf.io.parse_single_example(record, spec)
        image = tf.reshape(tf.io.decode_raw(ex["image"], tf.uint8), [size, size, 3])
        label = tf.cast(ex["label"], tf.int32)
        if not with_meta:
            return image, label
        meta = {
            "image": image,
            "age": ex["age"],
            "sex": tf.cast(ex["sex"], tf.int32),
            "localization": tf.cast(ex["localization"], tf.int32),
        }
        return meta, label

    if ordered or len(files) <= 1:
        records = tf.data.TFRecordDataset(files, buffer_size=1 << 22)
    else:
        records = tf.data.Dataset.from_tensor_slices(files).interleave(
            lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 22),
            cycle_length=min(len(files), 8),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@dataclass(frozen=True)
class SplitArrays:
    """One split in memory, rows in ``<split>.csv`` order (for evaluation)."""

    images: np.ndarray  # uint8 [N, S, S, 3]
    labels: np.ndarray  # int32 [N]
    image_ids: np.ndarray  # str [N]
    lesion_ids: np.ndarray  # str [N]
    age: np.ndarray  # float32 [N], NaN = unknown
    sex: np.ndarray  # int32 [N]
    localization: np.ndarray  # int32 [N]


def read_split_numpy(prepared_dir: str | Path, split: str) -> SplitArrays:
    """Load a whole split into numpy arrays, in ``<split>.csv`` order (checked against it)."""
    import csv

    import tensorflow as tf

    prepared_dir = Path(prepared_dir)
    manifest = load_manifest(prepared_dir)
    files = _split_files(prepared_dir, split, manifest)
    size = int(manifest["image_size"])
    n = int(manifest["splits"][split]["n"])
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "image_id": tf.io.FixedLenFeature([], tf.string),
        "lesion_id": tf.io.FixedLenFeature([], tf.string),
        "age": tf.io.FixedLenFeature([], tf.float32),
        "sex": tf.io.FixedLenFeature([], tf.int64),
        "localization": tf.io.FixedLenFeature([], tf.int64),
    }

    def parse(batch: Any) -> Any:
        ex = tf.io.parse_example(batch, spec)
        ex["image"] = tf.reshape(tf.io.decode_raw(ex["image"], tf.uint8), [-1, size, size, 3])
        return ex

    images = np.empty((n, size, size, 3), dtype=np.uint8)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in spec if k != "image"}
    i = 0
    ds = tf.data.TFRecordDataset(files, buffer_size=1 << 22).batch(256).map(parse)
    for batch in ds.as_numpy_iterator():
        m = len(batch["label"])
        if i + m > n:
            raise StageError(f"{prepared_dir}: split {split!r} holds more records than the manifest's {n}")
        images[i : i + m] = batch["image"]
        for k in cols:
            cols[k].append(batch[k])
        i += m
    if i != n:
        raise StageError(f"{prepared_dir}: split {split!r} holds {i} records, the manifest says {n}")

    def cat(k: str) -> np.ndarray:
        return np.concatenate(cols[k]) if cols[k] else np.zeros(0)

    image_ids = np.array([b.decode() for b in cat("image_id")], dtype=str)
    csv_path = prepared_dir / manifest["splits"][split]["csv"]
    with open(csv_path, newline="", encoding="utf-8") as fh:
        csv_ids = [row["image_id"] for row in csv.DictReader(fh)]
    if csv_ids != image_ids.tolist():
        raise StageError(f"{csv_path}: image_id order differs from the shards; rerun the prepare stage")
    return SplitArrays(
        images=images,
        labels=cat("label").astype(np.int32),
        image_ids=image_ids,
        lesion_ids=np.array([b.decode() for b in cat("lesion_id")], dtype=str),
        age=cat("age").astype(np.float32),
        sex=cat("sex").astype(np.int32),
        localization=cat("localization").astype(np.int32),
    )
