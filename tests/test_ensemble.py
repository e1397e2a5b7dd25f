"""Ensemble weights and stacking (src.ensemble), score tables made elsewhere, and blending files (src.blend)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import src.ensemble
from src.blend import blend
from src.config import PipelineError, PredictConfig
from src.ensemble import (
    Blend,
    BlendSetting,
    as_arrays,
    check_blend_config,
    choose_blend,
    compare_blends,
    search_class_weights,
    search_weights,
)
from src.metrics import get_metric
from src.score_table import ScoreTableWriter, matching_rows, read_external_scores


def setting(**predict) -> BlendSetting:
    return BlendSetting("global_oof", PredictConfig(**predict), get_metric(None), np.full(4, 0.3), np.ones(2))


def good_and_noise(n: int = 160, m: int = 4, seed: int = 0):
    """Truth, a run whose scores follow it, and a run of pure noise."""
    rng = np.random.default_rng(seed)
    truth = (rng.random((n, m)) < 0.3).astype(np.uint8)
    good = np.clip(0.55 * truth + 0.45 * rng.random((n, m)), 0, 1)
    return truth, good, rng.random((n, m))


def test_weighted_mean_of_runs_that_differ_arrays_and_tables_alike(tmp_path):
    rng = np.random.default_rng(1)
    first, second = rng.random((10, 6)), rng.random((10, 6))
    expected = (1.0 * first + 3.0 * second) / 4.0
    blended = Blend("hand", np.array([1.0, 3.0])).combine([first, second])
    np.testing.assert_allclose(blended, expected)
    assert np.abs(blended - (first + second) / 2).max() > 1e-3  # the weights show
    writer = ScoreTableWriter(tmp_path / "second.npz", [f"i{k}" for k in range(10)], 6, np.float32)
    writer.append(second)
    table = writer.close()  # read a block of rows at a time, combined as read
    np.testing.assert_allclose(Blend("hand", np.array([1.0, 3.0])).combine([first, table])[:], expected, rtol=1e-6)
    np.testing.assert_array_equal(as_arrays([first, table])[1], table[:])  # a blend is fitted on arrays ...
    assert as_arrays([first, table], max_cells=100) is None  # ... up to a size, then predict keeps hand weights
    per_class = np.array([[1.0, 0, 1, 1, 1, 1], [1.0, 1, 0, 1, 1, 3]])
    mixed = Blend("search", per_class).combine([first, second])
    np.testing.assert_allclose(mixed[:, 1], second[:, 1])
    np.testing.assert_allclose(mixed[:, 2], first[:, 2])
    np.testing.assert_allclose(mixed[:, 5], (first[:, 5] + 3 * second[:, 5]) / 4)


def test_searched_weights_find_the_better_run_and_leave_the_noise_out():
    truth, good, noise = good_and_noise()
    weights = search_weights(truth, [noise, good], setting())
    assert weights[0] <= 0.05 and weights[1] >= 0.95
    per_class = search_class_weights(sparse.csr_matrix(truth), [noise, good], setting(weights_per_class=True))
    assert per_class.shape == (2, 4) and (per_class[0] <= 0.1).all()
    # Two copies of one run: nothing to gain, the equal start stays.
    np.testing.assert_array_equal(search_weights(truth, [good, good.copy()], setting()), [0.5, 0.5])


def test_cross_fold_weights_never_see_the_fold_they_score(monkeypatch):
    # Each fold has its own good run: run 0 follows the truth on fold 0 and is noise on fold 1; run 1 the opposite.
    truth, good, noise = good_and_noise(200)
    folds = np.arange(200) % 2
    run0 = np.where(folds[:, None] == 0, good, noise)
    run1 = np.where(folds[:, None] == 1, good, noise)
    marked = [np.column_stack([run, np.arange(200) / 1000]) for run in (run0, run1)]  # column 4: the row
    truth = np.column_stack([truth, np.zeros(200, np.uint8)])
    seen = []
    fit = src.ensemble.fit_blend

    def spy(method, truth, parts, setting):
        seen.append((method, set(np.rint(parts[0][:, 4] * 1000).astype(int))))
        return fit(method, truth, parts, setting)

    monkeypatch.setattr(src.ensemble, "fit_blend", spy)
    cfg = BlendSetting("global_oof", PredictConfig(), get_metric(None), np.full(5, 0.3), np.ones(2))
    results = compare_blends(truth, marked, folds, ["hand", "equal", "search"], cfg)
    fold_rows = [set(np.flatnonzero(folds == f)) for f in (0, 1)]
    searched = [rows for method, rows in seen if method == "search"]
    assert searched[0] == set(range(200))  # the blend applied: fitted on every row
    assert searched[1:] == [fold_rows[1], fold_rows[0]]  # each fold's: the other fold's rows only
    # Honest: weights fitted on fold 1 back run 1, noise on fold 0, so search scores below equal weights
    # cross-fold, though never below them in-sample (weights fitted on every row would score like equal ones).
    assert results["search"]["in_sample"] >= results["equal"]["in_sample"]
    assert results["search"]["cross_fold"] < results["equal"]["cross_fold"] - 0.05


def test_stack_learns_a_run_that_scores_backwards_and_auto_ties_go_to_the_simpler():
    truth, good, noise = good_and_noise(200)
    backwards = 1 - good
    cfg = BlendSetting("oof_f1", PredictConfig(stack="logistic", weights="auto"), get_metric(None), np.full(4, 0.3),
                       np.ones(1))
    results = compare_blends(sparse.csr_matrix(truth), [backwards], np.arange(200) % 2, ["hand", "stack"], cfg)
    assert results["stack"]["cross_fold"] > results["hand"]["cross_fold"] + 0.2
    assert (results["stack"]["blend"].stack.own[:, 0] < 0).all()  # each class's model turned the run around
    assert choose_blend(cfg.predict, results)[0] == "stack"
    tied = {name: {"cross_fold": 0.5} for name in ("search", "equal", "hand")}
    assert choose_blend(PredictConfig(weights="auto"), tied)[0] == "hand"
    assert choose_blend(PredictConfig(weights="search"), tied) == ("search", "configured (predict.weights=search)")
    with pytest.raises(PipelineError, match="predict.stack_other_classes=true with 7178 classes"):
        check_blend_config(PredictConfig(stack="logistic", stack_other_classes=True), 7178)


def test_external_score_tables_are_checked_on_labels_and_ids(tmp_path):
    codes = ("cat", "dog", "fish")
    path = tmp_path / "a_test.csv"
    pd.DataFrame({"Id": ["x", "y"], "fish": [0.1, 0.2], "cat": [0.3, 0.4], "dog": [0.5, 0.6]}).to_csv(path, index=False)
    ids, scores = read_external_scores(path, codes)
    np.testing.assert_allclose(scores, [[0.3, 0.5, 0.1], [0.4, 0.6, 0.2]])  # put in the run's label order
    np.testing.assert_array_equal(matching_rows(path, ids, ["y", "x"], "test"), [1, 0])
    with pytest.raises(PipelineError, match=r"a_test.csv: test Id 'z' is missing"):
        matching_rows(path, ids, ["x", "z"], "test")
    with pytest.raises(PipelineError, match=r"a_test.csv: Id 'y' is not a test Id"):
        matching_rows(path, ids, ["x"], "test")
    pd.DataFrame({"Id": ["x"], "cat": [0.1], "cow": [0.2], "dog": [0.3], "fish": [0.4]}).to_csv(path, index=False)
    with pytest.raises(PipelineError, match=r"a_test.csv: column 'cow' is not a label of the run"):
        read_external_scores(path, codes)
    pd.DataFrame({"Id": ["x"], "0": [0.1], "1": [0.2]}).to_csv(path, index=False)
    with pytest.raises(PipelineError, match=r"a_test.csv: no column for label '2'"):
        read_external_scores(path, codes)


def test_blend_submissions_by_vote_and_scores_by_rank(tmp_path):
    files = []
    for name, labels in (("a", ["1 2", "3", "0"]), ("b", ["2", "3 4", "5"]), ("c", ["2 1", "4", "6"])):
        files.append(tmp_path / f"{name}.csv")
        pd.DataFrame({"Id": ["p", "q", "r"], "Predicted": labels}).to_csv(files[-1], index=False)
    out = blend(files, tmp_path / "vote.csv")
    voted = pd.read_csv(out, dtype=str)
    assert voted["Predicted"].tolist() == ["1 2", "3 4", "0 5 6"]  # a majority, or the most votes (a 3-way tie)
    weighted = pd.read_csv(blend(files, tmp_path / "w.csv", weights=[3, 1, 1]), dtype=str)
    assert weighted["Predicted"].tolist() == ["1 2", "3", "0"]  # file a alone holds more than half the weight
    pd.DataFrame({"Id": ["q", "p", "s"], "Predicted": ["1", "1", "1"]}).to_csv(files[2], index=False)
    with pytest.raises(PipelineError, match=r"c.csv: Id 'r' of the first file is missing"):
        blend(files, tmp_path / "bad.csv")
    scores = []
    for name, values in (("s1", [[0.9, 0.1], [0.2, 0.3]]), ("s2", [[0.1, 0.2], [0.8, 0.9]])):
        scores.append(tmp_path / f"{name}.csv")
        pd.DataFrame(values, columns=["0", "1"]).assign(Id=["p", "q"])[["Id", "0", "1"]].to_csv(scores[-1],
                                                                                             index=False)
    ranked = pd.read_csv(blend(scores, tmp_path / "rank.csv", by="rank", weights=[3, 1]), dtype={"Id": str})
    np.testing.assert_allclose(ranked[["0", "1"]].to_numpy(), [[(3 * 1 + 0.5) / 4, 0.5], [(3 * 0.5 + 1) / 4, 1.0]])


def test_the_submission_log_message_names_the_blend_and_runs_made_elsewhere():
    from src.submit import default_message

    record = {"strategy": "oof_f1", "metric": "macro_f1", "oof_cross_fold": 0.5,
              "runs": [{"dir": "runs/a", "weight": 0.8, "folds": [0, 1]},
                       {"dir": None, "scores": {"oof": "b_oof.csv", "test": "b_test.csv"}, "weight": 0.2, "folds": []}],
              "ensemble": {"method": "search", "describe": "search 0.8, 0.2"}}
    message = default_message(record, "abc")
    assert message == ("oof_f1 (oof macro_f1 0.5000, cross-fold) | runs/a[0,1] x0.8; b_oof.csv[] x0.2 | "
                       "ensemble search 0.8, 0.2 | config abc")
    record["ensemble"] = None  # the default: the hand weights, the message as before
    assert default_message(record, "abc").endswith("b_oof.csv[] x0.2 | config abc")


def test_a_bundle_refuses_a_prediction_it_cannot_repeat(tmp_path):
    from src.bundle import collect_weights

    (tmp_path / "decision.json").write_text("{}")
    stacked = {"runs": [{"dir": "runs/a", "weight": 1.0, "folds": [0]}],
               "ensemble": {"method": "stack", "describe": "stack logistic", "weights": None, "stack": {"own": []}}}
    with pytest.raises(PipelineError, match="used stack logistic; a bundle ships run folders"):
        collect_weights(stacked, tmp_path)
    elsewhere = {"runs": [{"dir": None, "scores": {"oof": "b.csv", "test": "t.csv"}, "weight": 1.0, "folds": []}],
                 "ensemble": None}
    with pytest.raises(PipelineError, match="used score tables"):
        collect_weights(elsewhere, tmp_path)
