"""The peer a user would try instead of this pipeline: fastai's own from-scratch recipe, on the same split.

fastai's stock path for a multilabel image set trained from scratch, as its docs and course teach it:
``xresnet18`` with the data's input channels, ``Learner.lr_find`` and its ``valley`` suggestion,
``fit_one_cycle``, ``aug_transforms`` (flips both ways, rotations, zoom, lighting, warp) on the batch,
``BCEWithLogitsLossFlat``, ``Learner.tta`` and one global threshold chosen on the 20 % holdout (the fold the
pipeline validates on). fastai is benchmark-only: ``benchmarks/requirements-fastai.txt``, never in
``requirements.txt``.

Images are decoded once with the pipeline's own reader (``src.images.read_image``: the format's files, resized
to ``data.image_size``), so both sides see the same pixels.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch
from tqdm import tqdm

from src.images import read_image


def load_pixels(table, size: int, channels: int) -> np.ndarray:
    """N x C x size x size uint8 images of a sample table (the format's files, one resize)."""
    images = [read_image(files, size, channels) for files in tqdm(table["files"], desc="decode", leave=False)]
    return np.stack(images).transpose(0, 3, 1, 2).copy()


def best_global_threshold(probs: np.ndarray, truth: np.ndarray, score) -> float:
    """The one threshold in 0.05..0.95 (step 0.01) that scores best on the holdout."""
    grid = np.round(np.arange(0.05, 0.951, 0.01), 2)
    return float(grid[int(np.argmax([score(truth, probs >= t) for t in grid]))])


def fastai_recipe(fit_x: np.ndarray, fit_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                  test_x: np.ndarray, epochs: int, batch_size: int, seed: int, score, tta: bool = True,
                  oriented: bool = False
                  ) -> dict:
    """Train fastai's from-scratch recipe on (fit_x, fit_y), validate on (val_x, val_y), predict ``test_x``.

    ``oriented``: the images have an up and a left (no flips; fastai's rotations, zoom, warp and lighting stay).
    Returns ``val_probs``, ``test_probs``, ``threshold`` (global, chosen on the holdout by ``score``),
    ``lr`` (the valley suggestion), ``seconds``."""
    # fastai.vision.all, as its docs import it: it also patches Learner with lr_find, fit_one_cycle and tta
    from fastai.vision.all import (
        BCEWithLogitsLossFlat,
        Datasets,
        IntToFloatTensor,
        Learner,
        Normalize,
        ProgressCallback,
        TensorImage,
        TensorMultiCategory,
        aug_transforms,
        set_seed,
        valley,
        xresnet18,
    )

    start = time.perf_counter()
    set_seed(seed, reproducible=True)
    images = np.concatenate([fit_x, val_x, test_x])  # items are row numbers; the test rows come last
    labels = np.concatenate([fit_y, val_y]).astype(np.float32)
    splits = [list(range(len(fit_x))), list(range(len(fit_x), len(labels)))]
    datasets = Datasets(list(range(len(labels))),
                        tfms=[[lambda i: TensorImage(torch.from_numpy(images[i]))],
                              [lambda i: TensorMultiCategory(torch.from_numpy(labels[i]))]], splits=splits)
    scaled = torch.from_numpy(fit_x).float() / 255
    mean, std = scaled.mean(dim=(0, 2, 3)), scaled.std(dim=(0, 2, 3))
    dls = datasets.dataloaders(bs=batch_size, device=torch.device("cpu"), num_workers=0, after_batch=[
        IntToFloatTensor(), *aug_transforms(do_flip=not oriented, flip_vert=not oriented),
        Normalize.from_stats(mean, std)])
    model = xresnet18(c_in=images.shape[1], n_out=labels.shape[1])
    with tempfile.TemporaryDirectory(prefix="fastai_peer_") as scratch:  # lr_find saves and restores a model there
        learn = Learner(dls, model, loss_func=BCEWithLogitsLossFlat(), path=scratch)
        learn.remove_cb(ProgressCallback)
        lr = float(learn.lr_find(suggest_funcs=(valley,), show_plot=False).valley)
    learn.fit_one_cycle(epochs, lr)
    if tta:
        val_probs = learn.tta(ds_idx=1, n=8)[0].numpy()
    else:
        val_probs = learn.get_preds(ds_idx=1)[0].numpy()
    test_dl = dls.test_dl(list(range(len(labels), len(images))), with_labels=False)
    test_probs = (learn.tta(dl=test_dl, n=8) if tta else learn.get_preds(dl=test_dl))[0].numpy()
    threshold = best_global_threshold(val_probs, val_y, score)
    return {"val_probs": val_probs, "test_probs": test_probs, "threshold": threshold, "lr": lr,
            "seconds": time.perf_counter() - start}
