"""The TFRecord writer (no TensorFlow) against TensorFlow's own writer and parser."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from skinlesion.core.errors import StageError
from skinlesion.model.tfdata import (
    FEATURES,
    crc32c,
    crc32c_many,
    encode_example,
    frame_records,
    load_manifest,
    read_split,
)


def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_matches_the_standard_check_value_and_a_bitwise_reference():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"\x00" * 32) == 0x8A9136AA  # RFC 3720 test vector
    rng = np.random.default_rng(0)
    lengths = [4, 5, 7, 8, 9, 63, 64, 65, 1000, 4099]
    messages = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths]
    got = crc32c_many(messages).tolist()  # one batch of mixed lengths
    assert got == [_crc32c_bitwise(m) for m in messages]
    assert [crc32c(m) for m in messages] == got
    with pytest.raises(ValueError, match="at least 4 bytes"):
        crc32c_many([b"abc"])


IMAGE_BYTES = (12, 64 * 64 * 3, 224 * 224 * 3)  # tiny, the default size, a 224 px backbone


def _values(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {
        "image": rng.integers(0, 256, IMAGE_BYTES[i % 3], dtype=np.uint8).tobytes(),
        "label": i,
        "image_id": f"ISIC_{i:07d}",
        "lesion_id": "HAM_0000001",
        "age": float("nan") if i == 1 else 40.5 + i,
        "sex": 2,
        "localization": 14,
    }


def test_records_are_byte_identical_to_tensorflows_writer_and_parse_back(tmp_path):
    import tensorflow as tf

    payloads = [encode_example(_values(i)) for i in range(4)]  # mixed lengths in one batch
    ours = tmp_path / "ours.tfrecord"
    ours.write_bytes(b"".join(frame_records(payloads)))
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as w:
        for p in payloads:
            w.write(p)
    assert ours.read_bytes() == (tmp_path / "tf.tfrecord").read_bytes()

    for i, raw in enumerate(tf.data.TFRecordDataset(str(ours)).as_numpy_iterator()):
        ex = tf.train.Example.FromString(raw).features.feature
        assert set(ex) == set(FEATURES)
        v = _values(i)
        assert ex["image"].bytes_list.value == [v["image"]]
        assert ex["image_id"].bytes_list.value == [v["image_id"].encode()]
        assert ex["label"].int64_list.value == [i]
        assert ex["localization"].int64_list.value == [14]
        age = ex["age"].float_list.value[0]
        assert math.isnan(age) if i == 1 else age == pytest.approx(v["age"])


def test_a_corrupted_record_is_refused_by_the_reader(tmp_path):
    import tensorflow as tf

    data = bytearray(b"".join(frame_records([encode_example(_values(0))])))
    data[20] ^= 0xFF
    (tmp_path / "bad.tfrecord").write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError, match="corrupted record"):
        list(tf.data.TFRecordDataset(str(tmp_path / "bad.tfrecord")))


def test_load_manifest_and_read_split_errors_name_the_file(tmp_path):
    with pytest.raises(StageError, match=r"manifest.json: not found; run the prepare stage first"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(StageError, match=r"format_version 99, this code reads 1; rerun the prepare stage"):
        load_manifest(tmp_path)
    manifest = {
        "format_version": 1,
        "image_size": 8,
        "splits": {"train": {"shards": ["train-00000-of-00001.tfrecord"]}},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StageError, match=r"no split 'test'; have \['train'\]"):
        read_split(tmp_path, "test")
    with pytest.raises(StageError, match=r"missing shard\(s\) .*train-00000-of-00001.tfrecord"):
        read_split(tmp_path, "train")
