"""The bad-input matrix: break a copy of the tiny dataset one way at a time and check that validation
names the culprit (file path or csv row) and says what is wrong; several problems are all reported."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from src.formats import read_train_labels
from src.validate import validate
from tests.conftest import REPO_ROOT, TINY_CLASSES, tiny_config


@pytest.fixture
def data(tiny_data, tmp_path) -> Path:
    """A private copy of the session dataset, free to break."""
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


def _train_ids(data: Path) -> list[str]:
    return pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)["Id"].tolist()


def _png(data: Path, sample_id: str, channel: str, split: str = "train") -> Path:
    return data / split / f"{sample_id}_{channel}.png"


def _edit_csv(path: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(frame).to_csv(path, index=False)


def _row(data: Path, csv: str, index: int) -> str:
    """How a problem on the ``index``-th data row of a csv is located: line numbers count the header."""
    return f"{data / csv} row {index + 2}"


# Each breaker damages the dataset and returns (where the problem must be located, what it must say).


def missing_channel(data):
    path = _png(data, _train_ids(data)[3], "green")
    path.unlink()
    return str(path), "missing image"


def garbage_png(data):
    path = _png(data, _train_ids(data)[4], "red")
    path.write_bytes(b"this is not a PNG at all" * 10)
    return str(path), "unreadable image"


def truncated_png(data):
    path = _png(data, _train_ids(data)[5], "blue")
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return str(path), "unreadable image"


def wrong_size(data):
    path = _png(data, _train_ids(data)[6], "yellow")
    plane = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(path), cv2.resize(plane, (plane.shape[1] // 2, plane.shape[0] // 2)))
    return str(path), f"wrong size {plane.shape[1] // 2}x{plane.shape[0] // 2}, expected " \
                      f"{plane.shape[1]}x{plane.shape[0]}"


def rgb_png(data):
    path = _png(data, _train_ids(data)[7], "green")
    plane = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(path), np.stack([plane] * 3, axis=-1))
    return str(path), "3 channel(s)"


def png_16bit(data):
    path = _png(data, _train_ids(data)[8], "red")
    plane = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(path), plane.astype(np.uint16) * 257)
    return str(path), "expected 8-bit grayscale"


def duplicate_id(data):
    _edit_csv(data / "train.csv", lambda frame: pd.concat([frame, frame.iloc[[2]]], ignore_index=True))
    return _row(data, "train.csv", len(_train_ids(data)) - 1), f"duplicate Id '{_train_ids(data)[2]}'"


def label_out_of_range(data):
    def edit(frame):
        frame.loc[9, "Target"] = f"1 {TINY_CLASSES}"
        return frame

    _edit_csv(data / "train.csv", edit)
    return _row(data, "train.csv", 9), f"label {TINY_CLASSES} is outside [0, {TINY_CLASSES})"


def non_numeric_label(data):
    def edit(frame):
        frame.loc[10, "Target"] = "3 x"
        return frame

    _edit_csv(data / "train.csv", edit)
    return _row(data, "train.csv", 10), "label 'x' is not a non-negative integer"


def negative_label(data):
    def edit(frame):
        frame.loc[11, "Target"] = "-1"
        return frame

    _edit_csv(data / "train.csv", edit)
    return _row(data, "train.csv", 11), "label '-1' is not a non-negative integer"


def _bad_id(bad: str):
    def breaker(data):
        def edit(frame):
            frame.loc[12, "Id"] = bad
            return frame

        _edit_csv(data / "train.csv", edit)
        return _row(data, "train.csv", 12), "path separator or '..'"

    breaker.__name__ = f"id_{bad}"
    return breaker


def orphan_test_id(data):
    _edit_csv(data / "sample_submission.csv",
              lambda frame: pd.concat([frame, pd.DataFrame({"Id": ["test_ghost"], "Predicted": ["0"]})]))
    return str(data / "test" / "test_ghost_"), "missing image"


def missing_train_csv(data):
    (data / "train.csv").unlink()
    return str(data / "train.csv"), "file not found"


def missing_target_column(data):
    _edit_csv(data / "train.csv", lambda frame: frame.rename(columns={"Target": "Labels"}))
    return str(data / "train.csv"), "missing column(s) ['Target']"


def _extra_source(data: Path, sample_id: str, copy_of: str) -> str:
    """An extra source with one sample ``sample_id`` whose images are a copy of ``copy_of``'s;
    returns the config override that adds it."""
    extra = data.parent / "extra"
    (extra / "images").mkdir(parents=True)
    for channel in ("red", "green", "blue", "yellow"):
        shutil.copy(_png(data, copy_of, channel), extra / "images" / f"{sample_id}_{channel}.png")
    pd.DataFrame({"Id": [sample_id], "Target": ["1"]}).to_csv(extra / "extra.csv", index=False)
    return f"data.extra=[{{csv: {extra / 'extra.csv'}, images: {extra / 'images'}}}]"


BREAKERS = [missing_channel, garbage_png, truncated_png, wrong_size, rgb_png, png_16bit, duplicate_id,
            label_out_of_range, non_numeric_label, negative_label, _bad_id("a/b"), _bad_id("..x"),
            _bad_id("..\\x"), orphan_test_id, missing_train_csv, missing_target_column]
# Only a full read finds a truncated file; every other problem must be found by the quick check.
DEEP_ONLY = {truncated_png}


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda breaker: breaker.__name__)
def test_each_problem_is_located_and_explained(breaker, data, tmp_path):
    where, what = breaker(data)
    cfg = tiny_config(data, tmp_path)
    problems = validate(cfg, deep=breaker in DEEP_ONLY, progress=False)
    assert problems, "the broken dataset passed validation"
    # The culprit is named, the problem said, and nothing else is blamed.
    assert any(where in p.where and what in p.what for p in problems), [str(p) for p in problems]
    assert all(where in p.where for p in problems), [str(p) for p in problems]


@pytest.mark.parametrize(("breaker", "bad_text"), [
    (duplicate_id, None), (label_out_of_range, f"1 {TINY_CLASSES}"), (non_numeric_label, "3 x"),
    (_bad_id("a/b"), "a/b"),
], ids=["duplicate_id", "label_out_of_range", "non_numeric_label", "id_a/b"])
def test_csv_row_number_points_at_the_offending_line(breaker, bad_text, data, tmp_path):
    breaker(data)
    [problem] = validate(tiny_config(data, tmp_path), progress=False)
    csv, row = problem.where.rsplit(" row ", 1)
    line = Path(csv).read_text().splitlines()[int(row) - 1]
    # A duplicate is located at its second occurrence, which is the line the duplicated Id is on.
    assert (bad_text or _train_ids(data)[2]) in line


def test_truncated_png_is_found_by_the_default_check(data, tmp_path):
    # A cut-off file whose header still reads: only its missing IEND end chunk gives it away.
    where, _ = truncated_png(data)
    [problem] = validate(tiny_config(data, tmp_path), progress=False)
    assert problem.where == where and "truncated PNG" in problem.what


@pytest.mark.parametrize("table", ["train.csv", "sample_submission.csv"])
@pytest.mark.parametrize("content", ["header only", "0 bytes"])
def test_an_empty_label_table_is_a_problem_naming_the_file(data, tmp_path, table, content):
    header = "Id,Target\n" if table == "train.csv" else "Id,Predicted\n"
    (data / table).write_text(header if content == "header only" else "")
    problems = validate(tiny_config(data, tmp_path), progress=False)
    assert any(p.where == str(data / table) and ("no rows" in p.what or "empty file" in p.what)
               for p in problems), [str(p) for p in problems]


def test_truncated_png_is_found_by_deep_check(data, tmp_path):
    where, _ = truncated_png(data)
    deep = validate(tiny_config(data, tmp_path), deep=True, progress=False)
    assert [p.where for p in deep] == [where]


def test_duplicate_id_across_an_extra_source(data, tmp_path):
    sample_id = _train_ids(data)[0]
    cfg = tiny_config(data, tmp_path, _extra_source(data, sample_id, copy_of=sample_id))
    problems = validate(cfg, progress=False)
    assert [str(p) for p in problems] == [
        f"{data.parent / 'extra' / 'extra.csv'}: duplicate Id '{sample_id}' (also in an earlier training source)"
    ]


def test_extra_source_with_a_new_id_is_clean(data, tmp_path):
    # The control for the test above: an extra source is fine, only the shared Id was the problem.
    cfg = tiny_config(data, tmp_path, _extra_source(data, "extra00000", copy_of=_train_ids(data)[0]))
    assert validate(cfg, progress=False) == []
    assert "extra00000" in set(read_train_labels(cfg.data).frame["Id"])


def test_every_problem_is_reported_not_just_the_first(data, tmp_path):
    broken = [missing_channel(data), garbage_png(data), label_out_of_range(data), orphan_test_id(data)]
    problems = validate(tiny_config(data, tmp_path), progress=False)
    for where, what in broken:
        assert any(where in p.where and what in p.what for p in problems), (where, what)
    # One per broken file or row, and four for the test Id without images.
    assert len(problems) == len(broken) - 1 + 4


def test_clean_dataset_has_no_problems(tiny_data, tmp_path):
    assert validate(tiny_config(tiny_data, tmp_path), deep=True, progress=False) == []


def test_empty_target_is_accepted(data, tmp_path):
    sample_id = _train_ids(data)[13]

    def edit(frame):
        frame.loc[13, "Target"] = ""
        return frame

    _edit_csv(data / "train.csv", edit)
    cfg = tiny_config(data, tmp_path)
    assert validate(cfg, progress=False) == []
    frame = read_train_labels(cfg.data).frame.set_index("Id")
    assert frame.loc[sample_id, "labels"] == ()


def test_cli_exits_nonzero_and_lists_every_problem_on_stderr(data):
    broken = [missing_channel(data), truncated_png(data), non_numeric_label(data)]
    result = subprocess.run(
        [sys.executable, "-m", "src.validate", "--config", "configs/demo.yaml", "--deep",
         f"data.dir={data}", f"data.num_classes={TINY_CLASSES}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "dataset has 3 problem(s)" in result.stderr
    for where, what in broken:
        assert any(where in line and what in line for line in result.stderr.splitlines()), (where, what)
    assert "dataset OK" not in result.stdout
