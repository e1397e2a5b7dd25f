"""Near-duplicates across the training sources and test (src.duplicates): the pair search, the duplicates file on
the tiny data set with a test image copied from a training image, and the labels predict.overrides copies."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from src.config import PipelineError, override
from src.data import Vocabulary
from src.duplicates import (
    Overrides,
    apply_overrides,
    apply_recorded_overrides,
    duplicate_overrides,
    find_duplicates,
    hash_pairs,
)
from src.formats import load_test_table, load_train_table
from src.submit import default_message
from tests.conftest import tiny_config
from tests.helpers import copy_train_image_to_test


def test_hash_pairs_finds_every_pair_within_the_distance_in_any_block_size():
    rng = np.random.default_rng(0)
    left = rng.integers(0, 2**63, 50, dtype=np.uint64)
    right = np.concatenate([left[:5] ^ np.uint64(0b1011), rng.integers(0, 2**63, 30, dtype=np.uint64)])
    expected = {(i, j, bin(int(a) ^ int(b)).count("1")) for i, a in enumerate(left) for j, b in enumerate(right)
                if bin(int(a) ^ int(b)).count("1") <= 3}
    assert {(i, i, 3) for i in range(5)} <= expected
    for chunk in (None, 1, 7, 64):
        rows, cols, distances = hash_pairs(left, right, 3, chunk)
        assert set(zip(rows.tolist(), cols.tolist(), distances.tolist())) == expected
    assert all(len(part) == 0 for part in hash_pairs(left[:0], right, 3))
    # Within one array: each pair once, i < j, whatever the block size.
    both = np.concatenate([left, right])
    within = {(i, j, d) for i, j, d in zip(*(part.tolist() for part in hash_pairs(both, both, 3))) if i < j}
    assert (50, 0, 3) not in within and (0, 50, 3) in within
    for chunk in (None, 1, 7, 64):
        assert set(zip(*(part.tolist() for part in hash_pairs(both, None, 3, chunk)))) == within


@pytest.mark.parametrize("as_sparse", [False, True])
def test_apply_overrides_replaces_exactly_the_overridden_rows(as_sparse):
    predicted = np.zeros((4, 5), dtype=bool)
    predicted[:, 0] = True
    overrides = Overrides(np.array([1, 3]), [(2, 4), (0, 1)], [["a"], ["b", "c"]], [0, 2])
    given = sparse.csr_matrix(predicted) if as_sparse else predicted
    result = apply_overrides(given, overrides)
    result = result.toarray() if as_sparse else result
    expected = predicted.copy()
    expected[1] = [False, False, True, False, True]
    expected[3] = [True, True, False, False, False]
    np.testing.assert_array_equal(result, expected)
    assert predicted[:, 0].all() and not predicted[:, 1:].any()  # the input is left as it was
    ids, vocabulary = pd.Series(["t0", "t1", "t2", "t3"]), Vocabulary(tuple("abcde"), tuple("abcde"))
    record = {"overrides": overrides.record(ids, vocabulary, "dups.csv")}
    assert record["overrides"]["rows"] == 2
    assert record["overrides"]["images"][1] == {"Id": "t3", "labels": ["a", "b"], "from": ["b", "c"], "distance": 2}
    # What a bundle does with the record: the same rows, by Id, on a test set in another order and with an Id less.
    replayed = apply_recorded_overrides(record, given[[3, 0, 2]], ids[[3, 0, 2]].reset_index(drop=True), vocabulary)
    replayed = replayed.toarray() if as_sparse else replayed
    np.testing.assert_array_equal(replayed, expected[[3, 0, 2]])
    assert apply_recorded_overrides({"overrides": None}, given, ids, vocabulary) is given


def test_the_duplicates_file_pairs_a_copied_test_image_with_its_source_and_overrides_take_its_labels(tiny_data,
                                                                                                  tmp_path):
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    cfg = tiny_config(data, tmp_path, f"folds.duplicates_path={tmp_path / 'dups.csv'}")
    with pytest.raises(PipelineError, match=r"dups.csv not found .*python -m src.duplicates"):
        duplicate_overrides(cfg, load_test_table(cfg.data), load_train_table(cfg.data))
    train_table, test_table = load_train_table(cfg.data), load_test_table(cfg.data)
    source = train_table.iloc[int(np.argmax(train_table["labels"].map(len)))]  # a sample with the most labels
    copy_train_image_to_test(data, source["Id"], test_table["Id"][3])
    pairs = find_duplicates(cfg, progress=False)
    found = pairs[(pairs["source_b"] == "test")]
    assert found[["id_a", "source_a", "id_b", "distance"]].values.tolist() == [
        [source["Id"], "train", test_table["Id"][3], 0]]
    overrides = duplicate_overrides(cfg, test_table, train_table)
    assert overrides.rows.tolist() == [3] and overrides.labels == [source["labels"]]
    assert overrides.sources == [[source["Id"]]] and overrides.distances == [0]
    # A file that names an image the data no longer has is stale.
    pairs.assign(id_b="gone").to_csv(cfg.folds.duplicates_path, index=False)
    with pytest.raises(PipelineError, match=r"1 Id\(s\) are not in the data .*rerun `python -m src.duplicates`"):
        duplicate_overrides(cfg, test_table, train_table)
    # A stricter distance than the file was made with leaves out the pairs beyond it.
    pairs.assign(distance=3).to_csv(cfg.folds.duplicates_path, index=False)
    stricter = override(cfg, **{"folds.duplicate_distance": 2})
    assert len(duplicate_overrides(stricter, test_table, train_table).rows) == 0


def test_the_submit_message_counts_the_overrides():
    record = {"strategy": "oof_f1", "metric": "macro_f1", "oof_cross_fold": 0.5, "runs": [], "overrides": None}
    assert "overrides" not in default_message(record, "abc")
    record["overrides"] = {"rows": 7}
    assert "| overrides 7 |" in default_message(record, "abc")
