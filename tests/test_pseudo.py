"""The pseudo-label threshold rule on hand-computed arrays, the labels it keeps, and the formats' label csvs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from src import pseudo
from src.config import DataConfig, override
from src.data import Source
from src.formats import get_format
from src.pseudo import confident_labels, precision_thresholds
from src.score_table import ScoreTableWriter
from src.submit import default_message

# Column 0, ranked: precision 1/1 at 0.9, 2/2 at 0.8, 2/3 at 0.7, 3/4 at 0.6, 3/5 at 0.5 (not monotone).
# Column 1: 0.5 is held by two rows, one positive: >= 0.5 keeps both (2 of 3), never just the first (2 of 2).
SCORES = np.array([[0.9, 0.9], [0.8, 0.5], [0.7, 0.5], [0.6, 0.1], [0.5, 0.125]])
TRUTH = np.array([[1, 1], [1, 1], [0, 0], [1, 0], [0, 0]])


@pytest.mark.parametrize("precision, min_positives, expected", [
    (0.75, 1, [0.6, 0.9]),  # column 0: the lowest qualifying score, past the dip at 0.7
    (0.9, 1, [0.8, 0.9]),
    (0.6, 2, [0.5, 0.5]),  # column 1: 2 positives of 3 at 0.5
    (0.75, 3, [0.6, np.inf]),  # column 1 never holds 3 positives
    (0.75, 4, [np.inf, np.inf]),
    (0.9, 2, [0.8, np.inf]),  # column 1: 2 of 2 only if the tie at 0.5 were split
    (1.0, 1, [0.8, 0.9]),
])
def test_threshold_is_the_lowest_score_reaching_the_precision_with_enough_positives(precision, min_positives,
                                                                                     expected):
    assert precision_thresholds(TRUTH, SCORES, precision, min_positives).tolist() == expected


def test_thresholds_from_sparse_truth_and_scores_read_by_column_slabs(tmp_path, monkeypatch):
    """The many-label path (sparse truth, a float16 npz table read a slab of columns at a time) agrees with the
    dense one."""
    scores = np.array([[0.875, 0.25, 0.5], [0.75, 0.5, 0.5], [0.5, 0.75, 0.25], [0.25, 0.125, 0.75]])
    truth = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 0], [0, 0, 1]])
    writer = ScoreTableWriter(tmp_path / "s.npz", ["a", "b", "c", "d"], 3)
    writer.append(scores)
    monkeypatch.setattr(pseudo, "SLAB_ENTRIES", 8)  # two columns a slab: the last slab is one column
    got = precision_thresholds(sparse.csr_matrix(truth), writer.close(), 0.6, 1)
    assert got.tolist() == precision_thresholds(truth, scores, 0.6, 1).tolist() == [0.5, 0.25, 0.5]


def test_a_row_keeps_the_labels_clearing_their_thresholds():
    labels = confident_labels(SCORES, np.array([0.6, np.inf]))
    assert labels.toarray().astype(int).tolist() == [[1, 0], [1, 0], [1, 0], [1, 0], [0, 0]]


@pytest.mark.parametrize("fmt, settings", [("hpa", {"num_classes": 3}), ("openimages", {}),
                                           ("csv", {"path_column": "file"})])
def test_a_formats_label_csv_reads_back_through_its_reader(tmp_path, fmt, settings):
    cfg = DataConfig(format=fmt, **settings)
    images = tmp_path / "test"
    files = [(str(images / "a1.jpg"),), (str(images / "sub" / "b2.jpg"),)]
    table = pd.DataFrame({"Id": ["a1", "b2"], "files": files})
    codes = [("0", "2"), ("1",)] if fmt == "hpa" else [("/m/x", "/m/y"), ("/m/z",)]
    frame = get_format(cfg).label_csv(cfg, table, codes, images)
    frame.to_csv(tmp_path / "pseudo.csv", index=False)
    read = get_format(cfg).read_source(cfg, Source("extra0", tmp_path / "pseudo.csv", images), "train")
    assert not read.problems
    assert read.frame["Id"].tolist() == ["a1", "b2"] and [tuple(sorted(c)) for c in read.frame["codes"]] == codes
    if fmt != "hpa":
        assert [tuple(f) for f in read.frame["files"]] == ([files[0], (str(images / "b2.jpg"),)]
                                                           if fmt == "openimages" else files)


def test_the_submission_message_names_each_pseudo_label_source():
    record = {"strategy": "oof_f1", "runs": [{"dir": "runs/b", "folds": [0], "weight": 1.0}],
              "pseudo_labels": [{"run_dir": "runs/a", "rows": {"kept": 7, "dropped": 5}}]}
    assert default_message(record, "abc") == "oof_f1 (cross-fold) | runs/b[0] | pseudo 7 rows from runs/a | config abc"
    assert " pseudo " not in default_message({**record, "pseudo_labels": None}, "abc")


def test_bad_precision_is_one_clear_error(tiny_cfg):
    with pytest.raises(pseudo.PipelineError, match=r"--precision 1.5: expected a precision in \(0, 1\]"):
        pseudo.pseudo_labels(tiny_cfg, precision=1.5)
    assert not Path(tiny_cfg.run.dir).exists()



def test_oof_scores_are_the_runs_fold_tables_blended_as_recorded(tiny_cfg, tmp_path):
    """The OOF scores a prediction fitted on: each run's fold tables (rows matched by Id across runs), with the
    recorded searched weights, else the hand weights; a stack's cross-fitted scores are not kept: refused."""
    ids = np.array(["a", "b", "c", "d"])
    a, b = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]]), np.array([[0.9, 0.0], [0.8, 0.1],
                                                                              [0.7, 0.2], [0.6, 0.3]])
    for name, scores, order in (("a", a, [0, 1, 2, 3]), ("b", b, [3, 2, 1, 0])):  # run b lists its rows reversed
        for fold, rows in ((0, order[:2]), (1, order[2:])):
            path = tmp_path / name / f"fold{fold}" / "oof.csv"
            path.parent.mkdir(parents=True)
            pd.DataFrame({"Id": ids[rows], "0": scores[rows, 0], "1": scores[rows, 1]}).to_csv(path, index=False)
    cfg = override(tiny_cfg, **{"predict.runs": [{"dir": str(tmp_path / "a")},
                                                        {"dir": str(tmp_path / "b"), "weight": 3}]})
    runs = [{"dir": str(tmp_path / "a"), "folds": [0, 1], "weight": 1.0},
            {"dir": str(tmp_path / "b"), "folds": [0, 1], "weight": 3.0}]
    record = {"runs": runs, "checkpoint": "best", "ensemble": None}

    def oof(ensemble):
        return pseudo.recorded_oof(cfg, {**record, "ensemble": ensemble}, None, None, None)

    hand = oof(None)
    assert hand.ids.tolist() == ["a", "b", "c", "d"] and hand.folds.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(hand.scores, (a + 3 * b) / 4)
    np.testing.assert_allclose(oof({"weights": [0.75, 0.25], "stack": None}).scores, 0.75 * a + 0.25 * b)
    with pytest.raises(pseudo.PipelineError, match="a stacked prediction"):
        oof({"weights": None, "stack": {"own": [], "intercept": []}})
