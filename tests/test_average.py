"""Checkpoint averaging: kept epochs, their uniform mean, BatchNorm statistics re-estimated, and predict using it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from src.average import average, average_weights, refresh_batchnorm
from src.config import PipelineError, RunRef, override
from src.folds import make_folds
from src.formats import load_test_table, load_train_table
from src.predict import predict_run
from src.run_folder import RunFolder
from src.train import train
from tests.conftest import TINY_CLASSES, tiny_config


def test_averaged_weights_are_the_mean_of_the_kept_ones():
    states = [{"w": torch.randn(3, 2), "h": torch.randn(4).half(), "n": torch.tensor(i)} for i in range(3)]
    mean = average_weights(iter(states))
    torch.testing.assert_close(mean["w"], torch.stack([s["w"] for s in states]).mean(0))
    torch.testing.assert_close(mean["h"], torch.stack([s["h"].float() for s in states]).mean(0).half())
    assert mean["h"].dtype == torch.float16 and mean["n"] == 2  # counters: the last one's
    with pytest.raises(PipelineError, match="differ in their entries"):
        average_weights([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}])


def test_batchnorm_statistics_are_estimated_again_from_the_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2))
    model.eval()
    batches = [(torch.randn(4, 2, 5, 5) * 3 + 7, None) for _ in range(3)]
    refresh_batchnorm(model, batches, torch.device("cpu"))
    with torch.no_grad():
        features = [model[0](images) for images, _ in batches]
    bn = model[1]
    # update_bn's cumulative average: the mean over batches of each batch's statistics
    torch.testing.assert_close(bn.running_mean, torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([f.var((0, 2, 3)) for f in features]).mean(0))
    assert not model.training and bn.momentum == 0.1  # left as it was


@pytest.mark.slow
def test_kept_epochs_are_averaged_and_predict_uses_the_averaged_checkpoint(tiny_data, tmp_path):
    # One run trained on 24 px crops of the 32 px images, keeping its last 2 of 3 epochs.
    cfg = tiny_config(tiny_data, tmp_path, "train.epochs=3", "train.keep_epochs=2", "train.augment.crop=24")
    make_folds(cfg, progress=False)
    train(cfg, 0, progress=False)
    folder = RunFolder(cfg.run.dir)
    kept = folder.kept_epochs(0)
    assert list(kept) == [2, 3] and len(list(kept[2].parent.iterdir())) == 2  # exactly K, the oldest removed

    result = average(cfg, 0, progress=False)
    assert result["epochs"] == [2, 3] and set(result["scores"]) == {"averaged", "best", "last"}
    saved = torch.load(folder.checkpoint(0, "averaged"), weights_only=True)["model"]
    states = [torch.load(path, weights_only=True)["model"] for path in kept.values()]
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    for name, tensor in saved.items():
        mean = torch.stack([s[name].double() for s in states]).mean(0).to(tensor.dtype)
        if not name.endswith(statistics):
            torch.testing.assert_close(tensor, mean)
    running = [name for name in saved if name.endswith("running_mean")]
    assert running and all(not torch.allclose(saved[name], torch.stack([s[name] for s in states]).mean(0))
                           for name in running)  # re-estimated, not averaged
    with pytest.raises(PipelineError, match="no EMA weights"):
        average(cfg, 0, ema=True, progress=False)

    # predict.checkpoint=averaged: the averaged weights and their own OOF scores, here under 4 crop views.
    test_table, train_table = load_test_table(cfg.data), load_train_table(cfg.data)
    scores = {}
    for which in ("averaged", "best"):
        run_cfg = override(cfg, **{"predict.checkpoint": which, "predict.crops": 4, "predict.tta_reduce": "max"})
        scores[which], oof = predict_run(run_cfg, RunRef(dir=cfg.run.dir), test_table, train_table,
                                         torch.device("cpu"), progress=False)
        expected = pd.read_csv(folder.oof(0, which), dtype={"Id": str})
        np.testing.assert_allclose(oof[[str(c) for c in range(TINY_CLASSES)]].to_numpy(),
                                   expected[[str(c) for c in range(TINY_CLASSES)]].to_numpy(), atol=1e-6)
    assert not np.allclose(scores["averaged"], scores["best"])

