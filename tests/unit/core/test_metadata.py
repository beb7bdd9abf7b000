"""The one metadata reader (skinlesion.core.tables): what every stage sees of a table, and what it refuses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from skinlesion.core.errors import StageError
from skinlesion.core.schema import HAM_COLUMNS
from skinlesion.core.tables import read_rows, read_table

HEADER = ",".join(HAM_COLUMNS)


def _write(tmp_path: Path, text: str, name: str = "metadata.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def test_read_rows_keeps_line_numbers_and_accepts_crlf_bom_and_ragged_rows(tmp_path):
    text = (
        f"\ufeff{HEADER}\r\n"
        "HAM_1,ISIC_0000001,nv,histo,80,male,back\r\n"
        "\r\n"  # a blank line in the middle is a blank row (line 3)
        "HAM_2,ISIC_0000002,mel,histo,,female\r\n"  # one field short
        "HAM_3,ISIC_0000003,bcc,histo,45.0,male,back,extra\r\n"
        "\r\n\r\n"  # trailing blank lines are harmless
    )
    df = read_rows(_write(tmp_path, text), empty=None)
    assert list(df.index) == [2, 3, 4, 5] and df.index.name == "row"
    assert list(df.columns) == [*HAM_COLUMNS, "_fields"]
    assert df.loc[2, "age"] == "80" and df.loc[2, "localization"] == "back"
    assert df.loc[3].drop("_fields").isna().all() and df.loc[3, "_fields"] == 0
    assert df.loc[4, "age"] is None and df.loc[4, "localization"] is None and df.loc[4, "_fields"] == 6
    assert df.loc[5, "_fields"] == 8


def test_a_quoted_field_over_two_lines_is_named_by_the_line_it_starts_on(tmp_path):
    text = (
        f"{HEADER}\n"
        'HAM_1,ISIC_0000001,nv,histo,80,male,"lower\nextremity"\n'
        "HAM_2,ISIC_0000002,nv,histo,,male,back\n"
    )
    df = read_rows(_write(tmp_path, text))
    assert list(df.index) == [2, 4]
    assert df.loc[2, "localization"] == "lower\nextremity" and df.loc[4, "age"] == ""


def test_a_dataverse_tab_file_is_read_like_the_csv(tmp_path):
    rows = [("HAM_1", "ISIC_0000001", "nv", "histo", "80", "male", "back")]
    csv_path = _write(tmp_path, HEADER + "\n" + ",".join(rows[0]) + "\n")
    tab = "\t".join(HAM_COLUMNS) + "\r\n" + "\t".join(f'"{v}"' for v in rows[0]) + "\r\n"
    tab_path = _write(tmp_path, tab, "HAM10000_metadata.tab")
    assert read_table(tab_path).equals(read_table(csv_path))


def test_header_names_are_stripped_and_never_merged(tmp_path):
    df = read_rows(_write(tmp_path, " image_id ,dx,,dx\nISIC_0000001,nv,x,mel\n"))
    assert list(df.columns) == ["image_id", "dx", "unnamed_3", "dx_dup", "_fields"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file (no header line)"),
        (b"image_id,sex\nISIC_1,male\nISIC_2,f\xe9male\n", "not UTF-8 text (byte 0xe9 on line 3, offset 33)"),
    ],
)  # fmt: skip
def test_unreadable_files_are_named(tmp_path, content, message):
    path = tmp_path / "metadata.csv"
    path.write_bytes(content)
    with pytest.raises(StageError, match=re.escape(f"{path}: {message}")):
        read_rows(path)


def test_read_table_refuses_what_a_stage_cannot_use_naming_file_and_rows(tmp_path):
    good = "HAM_1,ISIC_0000001,nv,histo,80,male,back\n"
    path = _write(tmp_path, f"{HEADER}\n{good}\nHAM_2,ISIC_0000002,nv\n")
    with pytest.raises(StageError) as e:
        read_table(path)
    assert str(e.value) == f"{path}: wrong number of fields (the header has 7): row 4 has 3"

    path = _write(tmp_path, "lesion_id,image_id,age\nHAM_1,ISIC_0000001,3\n")
    with pytest.raises(StageError) as e:
        read_table(path, required=("image_id", "dx", "sex"))
    assert str(e.value) == f"{path}: missing column(s) ['dx', 'sex']; found ['lesion_id', 'image_id', 'age']"

    again = good.replace("HAM_1", "HAM_9")
    path = _write(tmp_path, f"{HEADER}\n{good}\n{good.replace('0001', '0002')}{again}{again}")
    with pytest.raises(StageError) as e:
        read_table(path, unique="image_id")
    assert str(e.value) == f"{path}: image_id listed more than once: ISIC_0000001 (rows 2, 5, 6)"
    assert len(read_table(path)) == 4  # the blank line is skipped; without `unique` all rows stay

    with pytest.raises(
        StageError, match=re.escape(f"{tmp_path / 'gone.csv'}: not found; run the split stage")
    ):
        read_table(tmp_path / "gone.csv", hint="run the split stage first")
