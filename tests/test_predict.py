"""The prediction stage end to end on a tiny trained run, and submission validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from src.config import PipelineError, override
from src.data import Vocabulary
from src.decision_record import apply_record, file_sha256
from src.duplicates import find_duplicates
from src.folds import make_folds
from src.formats import load_test_table, load_train_table, validate_submission
from src.model import d4_view
from src.predict import degenerate_reasons, predict, predict_run
from src.pseudo import pseudo_labels
from src.run_folder import provenance_path, source_provenance
from src.submit import default_message
from src.train import Trainer, build_parts, train
from tests.conftest import TINY_CLASSES, tiny_config
from tests.helpers import copy_train_image_to_test


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """Both folds of the tiny config trained for one epoch (shared by this module's tests)."""
    work = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(tiny_data, work)
    make_folds(cfg, progress=False)
    for fold in range(cfg.folds.n_splits):
        train(cfg, fold, progress=False)
    return cfg


def read_submission(cfg):
    return pd.read_csv(cfg.submission.path, dtype=str, keep_default_na=False)


@pytest.mark.slow
def test_predict_writes_valid_submission_and_report(trained):
    path = predict(trained, progress=False)
    submission = read_submission(trained)
    sample = pd.read_csv(f"{trained.data.dir}/sample_submission.csv", dtype=str)
    assert submission["Id"].tolist() == sample["Id"].tolist()
    labels = [list(map(int, p.split())) for p in submission["Predicted"]]
    assert all(1 <= len(row) and all(0 <= c < TINY_CLASSES for c in row) for row in labels)
    run = trained.run.dir
    probs = pd.read_csv(f"{run}/test_probs.csv", dtype={"Id": str})
    assert probs["Id"].tolist() == sample["Id"].tolist() and probs.shape[1] == TINY_CLASSES + 1
    assert probs.iloc[:, 1:].to_numpy().min() >= 0 and probs.iloc[:, 1:].to_numpy().max() <= 1
    strategies = pd.read_csv(f"{run}/report/strategies.csv")
    assert strategies["strategy"].tolist() == ["fixed", "oof_f1", "rate", "global_oof", "global_bounded", "top_k"]
    assert strategies["oof_macro_f1_in_sample"].between(0, 1).all()
    per_class = pd.read_csv(f"{run}/report/per_class.csv")
    assert len(per_class) == TINY_CLASSES
    for png in ("strategies.png", "per_class_f1.png", "f1_vs_threshold.png"):
        assert (f"{run}/report/{png}", open(f"{run}/report/{png}", "rb").read(8)) == \
            (f"{run}/report/{png}", b"\x89PNG\r\n\x1a\n")
    assert "oof_f1" in open(f"{run}/report/report.md").read()
    assert str(path) == trained.submission.path
    # predict.overrides off (the default): nothing overridden, nothing recorded or reported of it.
    assert json.loads(open(f"{run}/decision.json").read())["overrides"] is None
    assert "Overrides" not in open(f"{run}/report/report.md").read()
    # predict.threshold=auto (the default): the best cross-fold estimate is applied, and the report says so.
    chosen = strategies.loc[strategies["chosen"] == "<-"].iloc[0]
    assert chosen["oof_macro_f1_cross_fold"] == strategies["oof_macro_f1_cross_fold"].max()
    assert (f"Applied to test: **{chosen['strategy']}**: auto: best cross-fold OOF estimate "
            in open(f"{run}/report/report.md").read())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fixed", "oof_f1", "rate", "global_oof"])
def test_each_strategy_gives_a_valid_submission(trained, strategy, tmp_path):
    cfg = override(trained, **{"predict.threshold": strategy, "submission.path": str(tmp_path / "s.csv"),
                               "predict.tta": ["identity"]})
    predict(cfg, progress=False)
    assert len(read_submission(cfg)) == 12
    strategies = pd.read_csv(f"{cfg.run.dir}/report/strategies.csv", keep_default_na=False)
    assert strategies.loc[strategies["chosen"] == "<-", "strategy"].tolist() == [strategy]  # named: applied as is


@pytest.mark.slow
def test_per_image_f2_with_label_bounds_names_the_report_after_the_metric(trained, tmp_path):
    cfg = override(trained, **{"metric.name": "fbeta_samples", "metric.beta": 2.0, "predict.threshold": "top_k",
                               "predict.max_labels": 2, "predict.tta": ["identity"],
                               "run.dir": str(tmp_path / "out"), "predict.runs": [{"dir": trained.run.dir}],
                               "submission.path": str(tmp_path / "s.csv")})
    predict(cfg, progress=False)
    counts = read_submission(cfg)["Predicted"].str.split().str.len()
    strategies = pd.read_csv(tmp_path / "out" / "report" / "strategies.csv", keep_default_na=False)
    chosen = strategies[strategies["chosen"] == "<-"].iloc[0]
    assert chosen["strategy"] == "top_k" and chosen["decision"] in ("top 1", "top 2")
    assert (counts == int(chosen["decision"].split()[1])).all()  # the k compared on OOF is the k applied
    assert strategies["oof_f2_samples_cross_fold"].between(0, 1).all()
    assert "mean per-image F2" in (tmp_path / "out" / "report" / "report.md").read_text()


@pytest.mark.slow
def test_ensemble_of_experiments_and_fold_subset(trained, tmp_path):
    """Two experiments whose scores differ (another seed), weighted 1 and 3, on fold 0 only: the ensemble's test
    scores are the weighted mean of each experiment's own."""
    other = override(trained, **{"train.seed": 7, "run.dir": str(tmp_path / "other")})
    train(other, 0, progress=False)

    def test_scores(name: str, runs: list[dict]):
        cfg = override(trained, **{"predict.runs": runs, "predict.folds": [0], "run.dir": str(tmp_path / name),
                                   "submission.path": str(tmp_path / f"{name}.csv")})
        predict(cfg, progress=False)
        return pd.read_csv(tmp_path / name / "test_probs.csv").iloc[:, 1:].to_numpy()

    first = test_scores("first", [{"dir": trained.run.dir}])
    second = test_scores("second", [{"dir": other.run.dir}])
    ensemble = test_scores("ensemble", [{"dir": trained.run.dir, "weight": 1.0}, {"dir": other.run.dir, "weight": 3.0}])
    assert np.abs(first - second).max() > 1e-3  # the experiments differ, so the weights show
    # Each table holds 6 decimals: the mean of rounded scores is within 1e-6 of the rounded mean.
    np.testing.assert_allclose(ensemble, (1.0 * first + 3.0 * second) / 4.0, atol=2e-6)
    assert np.abs(ensemble - (first + second) / 2).max() > 1e-4  # not the unweighted mean


@pytest.mark.slow
def test_missing_fold_checkpoint_is_a_clear_error(trained, tmp_path):
    cfg = override(trained, **{"predict.folds": [0, 7], "submission.path": str(tmp_path / "x.csv")})
    with pytest.raises(PipelineError, match=r"fold\(s\) \[7\]"):
        predict(cfg, progress=False)
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.slow
def test_missing_sample_submission_is_a_clear_error(trained, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(trained.data.dir, data)
    (data / "sample_submission.csv").unlink()
    cfg = override(trained, **{"data.dir": str(data), "submission.path": str(tmp_path / "x.csv")})
    with pytest.raises(PipelineError, match="sample_submission.csv"):
        predict(cfg, progress=False)
    assert not (tmp_path / "x.csv").exists()


def test_unknown_tta_view_is_rejected(tiny_cfg):
    cfg = override(tiny_cfg, **{"predict.tta": ["identity", "rot45"]})
    with pytest.raises(PipelineError, match="rot45"):
        predict(cfg, progress=False)


def test_d4_views_are_the_eight_symmetries():
    image = torch.arange(9.0).view(1, 1, 3, 3)
    views = {v: d4_view(image, v) for v in ("identity", "rot90", "rot180", "rot270", "flip", "flip_rot90",
                                            "flip_rot180", "flip_rot270")}
    assert len({tuple(v.flatten().tolist()) for v in views.values()}) == 8
    assert torch.equal(views["rot180"], d4_view(views["rot90"], "rot90"))
    assert torch.equal(views["flip"], torch.flip(image, dims=[3]))


@pytest.mark.parametrize("frame, message", [
    (pd.DataFrame({"Id": ["a", "a"], "Predicted": ["0", "1"]}), "duplicates"),
    (pd.DataFrame({"Id": ["a"], "Predicted": ["0"]}), "missing"),
    (pd.DataFrame({"Id": ["a", "b"], "Predicted": ["0", "9"]}), "row 3"),
    (pd.DataFrame({"Id": ["a", "b"], "Predicted": ["0", ""]}), "row 3"),
    (pd.DataFrame({"Id": ["a", "b"], "Predicted": ["0", None]}), "NaN"),
    (pd.DataFrame({"Id": ["a", "b"], "Labels": ["0", "1"]}), "columns"),
])
def test_validate_submission_failures(frame, message):
    with pytest.raises(PipelineError, match=message):
        validate_submission(frame, ["a", "b"], Vocabulary.numbered(6))


@pytest.mark.slow
def test_label_embedding_run_trains_and_decodes_into_a_valid_submission(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "loss.name=label_embedding", "loss.embedding_dim=4")
    make_folds(cfg, progress=False)
    for fold in range(cfg.folds.n_splits):
        train(cfg, fold, progress=False)
    fold_dir = tmp_path / "run" / "fold0"
    for name in ("label_embedding.npz", "label_similarity.png", "label_map.png"):
        assert (fold_dir / name).is_file(), name
    state = torch.load(fold_dir / "best.pt", weights_only=True)["model"]
    assert state["head.weight"].shape[0] == 4  # the head regresses onto the k-dim label embedding
    oof = pd.read_csv(fold_dir / "oof.csv").iloc[:, 1:].to_numpy()
    assert oof.shape[1] == TINY_CLASSES and oof.min() >= 0 and oof.max() <= 1  # decoded per-class scores
    predict(cfg, progress=False)
    submission = read_submission(cfg)
    assert len(submission) == 12
    assert all(p.split() and all(0 <= int(c) < TINY_CLASSES for c in p.split()) for p in submission["Predicted"])


@pytest.mark.slow
def test_last_checkpoint_is_paired_with_its_own_oof_predictions(trained, tmp_path):
    for fold in range(trained.folds.n_splits):
        fold_dir = f"{trained.run.dir}/fold{fold}"
        last = pd.read_csv(f"{fold_dir}/oof_last.csv", dtype={"Id": str})
        assert last["Id"].tolist() == pd.read_csv(f"{fold_dir}/oof.csv", dtype={"Id": str})["Id"].tolist()
    cfg = override(trained, **{"predict.checkpoint": "last", "submission.path": str(tmp_path / "last.csv")})
    predict(cfg, progress=False)
    assert len(read_submission(cfg)) == 12


@pytest.mark.slow
def test_oof_tta_rescores_the_validation_rows_like_the_test_rows(trained, tmp_path):
    # With the identity view alone, re-scoring reproduces training's OOF probabilities (same weights).
    cfg = override(trained, **{"predict.oof_tta": True, "predict.tta": ["identity"],
                               "run.dir": str(tmp_path / "out"), "predict.runs": [{"dir": trained.run.dir}],
                               "submission.path": str(tmp_path / "s.csv")})
    predict(cfg, progress=False)
    assert len(read_submission(cfg)) == 12
    _, oof = predict_run(cfg, cfg.predict.runs[0], load_test_table(cfg.data), load_train_table(cfg.data),
                         torch.device("cpu"), progress=False)
    saved = pd.concat([pd.read_csv(f"{trained.run.dir}/fold{f}/oof.csv", dtype={"Id": str}) for f in (0, 1)])
    merged = oof.merge(saved, on="Id", suffixes=("", "_saved"))
    assert len(merged) == len(saved)
    for c in range(TINY_CLASSES):
        np.testing.assert_allclose(merged[str(c)], merged[f"{c}_saved"], atol=1e-5)
    # With flips added the scores change: the option really re-scores.
    flipped = override(cfg, **{"predict.tta": ["identity", "flip", "rot90"], "predict.tta_reduce": "max"})
    _, oof_max = predict_run(flipped, cfg.predict.runs[0], load_test_table(cfg.data), load_train_table(cfg.data),
                             torch.device("cpu"), progress=False)
    assert (oof_max.sort_values("Id")[[str(c) for c in range(TINY_CLASSES)]].to_numpy()
            >= oof.sort_values("Id")[[str(c) for c in range(TINY_CLASSES)]].to_numpy() - 1e-6).all()


@pytest.mark.slow
def test_a_degenerate_submission_is_refused_and_the_previous_one_kept(trained, tmp_path):
    # A threshold below every score gives every test image every label: what a model that learned nothing
    # produces with tuned thresholds (the same label set on every row, label rates far from training's).
    target = tmp_path / "submission.csv"
    target.write_text("previous\n")
    cfg = override(trained, **{"predict.force": False, "submission.path": str(target),
                               "run.dir": str(tmp_path / "out"), "predict.runs": [{"dir": trained.run.dir}],
                               "predict.threshold": "fixed", "predict.fixed_threshold": 1e-6})
    with pytest.raises(PipelineError, match="degenerate") as raised:
        predict(cfg, progress=False)
    assert "--force" in str(raised.value)
    assert target.read_text() == "previous\n"
    report = tmp_path / "out" / "report"
    assert (report / "label_rates.png").is_file() and "degenerate" in (report / "report.md").read_text()
    predict(override(cfg, **{"predict.force": True}), progress=False)
    assert len(read_submission(cfg)) == 12


def test_degenerate_reasons():
    rng = np.random.default_rng(0)
    train_labels = (rng.random((200, 6)) < [0.4, 0.3, 0.2, 0.1, 0.05, 0.05]).astype(np.uint8)
    sensible = (rng.random((50, 6)) < [0.4, 0.3, 0.2, 0.1, 0.05, 0.05]).astype(np.uint8)
    assert degenerate_reasons(sensible, train_labels) == []
    everything = np.ones((50, 6), dtype=np.uint8)
    reasons = degenerate_reasons(everything, train_labels)
    # Class 0 (rate 0.4) is only 2.5x off when every row gets every label.
    assert len(reasons) == 2 and "100% of the rows" in reasons[0] and "5 of 6 classes" in reasons[1]


@pytest.mark.slow
def test_nan_scores_stop_predict_and_keep_the_previous_submission(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained.run.dir, run)
    for fold in range(trained.folds.n_splits):  # diverged weights, as a run gone wrong would leave them
        path = run / f"fold{fold}" / "best.pt"
        ckpt = torch.load(path, weights_only=True)
        for weights in (ckpt["model"], ckpt["ema"] or {}):
            if "head.weight" in weights:
                weights["head.weight"].fill_(float("nan"))
        torch.save(ckpt, path)
    target = tmp_path / "submission.csv"
    target.write_text("previous\n")
    (run / "test_probs.csv").write_text("previous\n")
    cfg = override(trained, **{"run.dir": str(run), "submission.path": str(target)})
    with pytest.raises(PipelineError, match="NaN or infinite"):
        predict(cfg, progress=False)
    assert target.read_text() == (run / "test_probs.csv").read_text() == "previous\n"


@pytest.mark.slow
def test_holdout_fits_the_blend_and_decision_beside_a_score_pair_made_elsewhere(trained, tmp_path):
    """data.holdout (the demo's labelled test images) never trains; predict scores it, fits the ensemble (weights
    searched, a stack, hand and equal compared) and the decision on it, and reports OOF and holdout side by side.
    The second run is a score pair made elsewhere (noise, labels named by column)."""
    data = trained.data.dir
    holdout = {"csv": f"{data}/test_solution.csv", "images": f"{data}/test"}
    rng = np.random.default_rng(0)
    oof_ids = pd.concat([pd.read_csv(f"{trained.run.dir}/fold{f}/oof.csv", dtype={"Id": str})["Id"] for f in (0, 1)])
    test_ids = pd.read_csv(f"{data}/sample_submission.csv", dtype=str)["Id"]
    pair = {}
    for name, ids in (("oof", oof_ids), ("test", test_ids), ("holdout", test_ids)):
        frame = pd.DataFrame(rng.random((len(ids), TINY_CLASSES)), columns=[str(c) for c in range(TINY_CLASSES)])
        frame.insert(0, "Id", ids.to_numpy())
        pair[name] = str(tmp_path / f"teammate_{name}.csv")
        frame.to_csv(pair[name], index=False)
    cfg = override(trained, **{"data.holdout": holdout, "predict.weights": "auto", "predict.stack": "logistic",
                               "predict.tta": ["identity"], "run.dir": str(tmp_path / "out"),
                               "predict.runs": [{"dir": trained.run.dir}, {"scores": pair, "weight": 2}],
                               "submission.path": str(tmp_path / "s.csv")})
    assert not set(test_ids) & set(load_train_table(cfg.data)["Id"])  # the holdout is no training source
    predict(cfg, progress=False)
    assert len(read_submission(cfg)) == 12
    report = tmp_path / "out" / "report"
    strategies = pd.read_csv(report / "strategies.csv", keep_default_na=False)
    assert {"oof_macro_f1_cross_fold", "holdout_macro_f1_cross_fold"} <= set(strategies.columns)
    chosen = strategies[strategies["chosen"] == "<-"].iloc[0]
    assert chosen["holdout_macro_f1_cross_fold"] == strategies["holdout_macro_f1_cross_fold"].max()  # by holdout
    ensembles = pd.read_csv(report / "ensembles.csv", keep_default_na=False)
    assert ensembles["ensemble"].tolist() == ["hand", "equal", "search", "stack"]
    applied = ensembles[ensembles["chosen"] == "<-"].iloc[0]
    assert applied["holdout_macro_f1_cross_fold"] == ensembles["holdout_macro_f1_cross_fold"].max()
    record = json.loads((tmp_path / "out" / "decision.json").read_text())
    assert record["ensemble"]["fitted_on"] == "holdout" and record["ensemble"]["method"] == applied["ensemble"]
    assert set(record["ensemble"]["cross_fold"]) == {"hand", "equal", "search", "stack"}
    assert record["holdout_cross_fold"] == chosen["holdout_macro_f1_cross_fold"]
    assert record["runs"][1]["scores"]["oof"] == pair["oof"] and record["runs"][1]["folds"] == []
    # A teammate's table whose columns are not the run's labels: one line naming the file and the label.
    bad = pd.read_csv(pair["test"]).rename(columns={"3": "cow"})
    bad.to_csv(pair["test"], index=False)
    with pytest.raises(PipelineError, match=r"teammate_test.csv: column 'cow' is not a label of the run"):
        predict(override(cfg, **{"predict.runs": [{"scores": pair}, {"dir": trained.run.dir}]}), progress=False)


def test_overrides_give_a_copied_test_image_its_source_labels_counted_and_recorded(trained, tmp_path):
    data = Path(shutil.copytree(trained.data.dir, tmp_path / "data"))
    cfg = override(trained, **{"data.dir": str(data), "folds.duplicates_path": str(tmp_path / "dups.csv"),
                               "predict.tta": ["identity"], "submission.path": str(tmp_path / "on.csv"),
                               "predict.overrides": True})
    train_table, test_table = load_train_table(cfg.data), load_test_table(cfg.data)
    source = train_table.iloc[int(np.argmax(train_table["labels"].map(len)))]  # the most labels: unlike a guess
    copy_train_image_to_test(data, source["Id"], test_table["Id"][3])
    find_duplicates(cfg, progress=False)
    predict(cfg, progress=False)
    on = read_submission(cfg)
    expected = " ".join(map(str, source["labels"]))
    assert on["Predicted"][3] == expected
    # What the decision alone gives (predict.overrides off): every other row as submitted, row 3 not the copy's.
    record = json.loads((Path(cfg.run.dir) / "decision.json").read_text())
    scores = pd.read_csv(Path(cfg.run.dir) / "test_probs.csv", dtype={"Id": str}).iloc[:, 1:].to_numpy()
    decided = [" ".join(map(str, np.flatnonzero(row))) for row in apply_record(record, scores, cfg)]
    assert decided[3] != expected and on["Predicted"].drop(index=3).tolist() == decided[:3] + decided[4:]
    assert record["overrides"]["rows"] == 1
    assert record["overrides"]["images"] == [{"Id": test_table["Id"][3], "labels": expected.split(),
                                              "from": [source["Id"]], "distance": 0}]
    report = (Path(cfg.run.dir) / "report" / "report.md").read_text()
    assert "Overrides (predict.overrides): 1 of 12 test rows" in report


@pytest.mark.slow
def test_pseudo_labels_train_the_next_round_and_are_recorded(trained, tmp_path):
    """Round one's confident test labels (a low precision target, so the untrained model keeps some) become a
    train-only source: the next round trains on those rows in every fold, never validates on them, and its fold
    folder, decision.json and submission message name the prediction that made them."""
    first = override(trained, **{"predict.tta": ["identity"], "run.dir": str(tmp_path / "round1"),
                                 "predict.runs": [{"dir": trained.run.dir}],
                                 "submission.path": str(tmp_path / "s1.csv")})
    predict(first, progress=False)
    with pytest.raises(PipelineError, match="no test row has a label at OOF precision >= 1 .*nothing written"):
        pseudo_labels(first, tmp_path / "none", precision=1.0, min_positives=1000, progress=False)
    assert not (tmp_path / "none" / "pseudo_labels.csv").exists()
    (tmp_path / "none" / "pseudo_labels.csv").write_text("mine\n")  # not src.pseudo's: never replaced
    with pytest.raises(PipelineError, match="has no pseudo_labels.csv.provenance.json beside it"):
        pseudo_labels(first, tmp_path / "none", precision=0.3, min_positives=1, progress=False)
    csv = pseudo_labels(first, tmp_path / "pseudo", precision=0.3, min_positives=1, progress=False)
    provenance = json.loads(provenance_path(csv).read_text())
    pseudo = pd.read_csv(csv, dtype=str)
    assert list(pseudo.columns) == ["Id", "Target"] and 0 < len(pseudo) == provenance["rows"]["kept"]
    assert provenance["rows"]["kept"] + provenance["rows"]["dropped"] == 12 and (pseudo["Target"] != "").all()
    assert provenance["decision_sha256"] == file_sha256(tmp_path / "round1" / "decision.json")
    assert provenance["submission"]["sha256"] == file_sha256(tmp_path / "s1.csv")
    # Each kept label clears its class's threshold; a row keeps every label that does.
    scores = pd.read_csv(tmp_path / "round1" / "test_probs.csv", dtype={"Id": str}).set_index("Id")
    thresholds = pd.Series(provenance["thresholds"], dtype=float).reindex(scores.columns, fill_value=np.inf)
    expected = {i: " ".join(scores.columns[row >= thresholds]) for i, row in scores.iterrows()}
    assert dict(zip(pseudo["Id"], pseudo["Target"])) == {i: t for i, t in expected.items() if t}

    extra = [{"csv": str(csv), "images": f"{trained.data.dir}/test", "role": "train_only"}]
    second = override(trained, **{"data.extra": extra, "run.dir": str(tmp_path / "round2"), "predict.folds": [0],
                                  "predict.tta": ["identity"], "submission.path": str(tmp_path / "s2.csv")})
    parts = build_parts(second, 0, progress=False)
    assert set(pseudo["Id"]) <= set(parts.train_table["Id"]) and not set(pseudo["Id"]) & set(parts.val_table["Id"])
    Trainer(parts, progress=False).fit()
    oof_ids = set(pd.read_csv(tmp_path / "round2" / "fold0" / "oof.csv", dtype={"Id": str})["Id"])
    assert oof_ids and not oof_ids & set(pseudo["Id"])
    recorded = json.loads((tmp_path / "round2" / "fold0" / "pseudo_labels.json").read_text())
    assert recorded == [{"csv": str(csv), **provenance}]
    predict(second, progress=False)
    record = json.loads((tmp_path / "round2" / "decision.json").read_text())
    assert record["pseudo_labels"] == recorded
    assert f" | pseudo {len(pseudo)} rows from {tmp_path / 'round1'} | " in default_message(record, "abc")
    # Labels changed after src.pseudo wrote them are no longer that prediction's: training refuses them.
    csv.write_text(csv.read_text().replace("Target", "Target ", 1))
    with pytest.raises(PipelineError, match="changed since src.pseudo wrote it"):
        source_provenance(second.data)
