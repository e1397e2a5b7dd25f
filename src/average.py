"""Checkpoint averaging: one fold's last epochs' weights averaged, BatchNorm statistics re-estimated.

    python -m src.average --fold N [--ema] [--config FILE] [key=value ...]

Run with the config the fold was trained with, after training it with ``train.keep_epochs=K`` (the weights of
its last K epochs in ``fold<N>/epochs/``). The kept weights are averaged uniformly (``--ema``: their EMA weights,
when the run kept an EMA); the mean of BatchNorm running statistics is not the statistics of the mean weights,
so these are estimated again over the fold's training rows, without augmentation
(``torch.optim.swa_utils.update_bn``). The result is scored on the fold's validation rows beside ``best.pt`` and
``last.pt`` (a table), and written as ``fold<N>/averaged.pt`` (weights only) with its validation scores
(``oof_averaged.csv``): ``predict.checkpoint=averaged`` predicts with them; nothing else changes.

The HPA 2018 3rd place averaged its last epochs' weights this way (pudae/kaggle-hpa ``swa.py``: a moving average
over the last checkpoints, then ``bn_update`` over the training loader).
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from src.checkpoint import averaged_checkpoint, load_checkpoint, model_weights, save_weights
from src.cli import cli_parser, config_from_args, run_cli
from src.config import Config, PipelineError, override
from src.dataset import RGBYDataset, make_loader
from src.files import Staging, ensure_writable
from src.model import autocast
from src.pack import open_packed
from src.progress import bar as progress_bar
from src.run_folder import AVERAGED, RunFolder
from src.score_table import write_scores
from src.train import Trainer, build_parts

SCORE_COLUMNS = ("val_loss", "macro_f1", "macro_f1_tuned")


def average_weights(state_dicts: Iterable[dict]) -> dict:
    """The uniform mean of state dicts with the same keys, read one at a time (accumulated in float64);
    non-float entries (BatchNorm's batch counters) are taken from the last."""
    total: dict[str, torch.Tensor] = {}
    count = 0
    for state in state_dicts:
        if count and state.keys() != total.keys():
            raise PipelineError(f"the weights to average differ in their entries (e.g. "
                                f"{sorted(state.keys() ^ total.keys())[:3]}): not one network")
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                total[name] = tensor.clone()
            elif count:
                total[name] += tensor.double()
            else:
                total[name] = tensor.double()
        count += 1
    if not count:
        raise PipelineError("no weights to average")
    dtypes = {name: tensor.dtype for name, tensor in state.items()}
    return {name: (tensor / count).to(dtypes[name]) if tensor.is_floating_point() else tensor
            for name, tensor in total.items()}


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def refresh_batchnorm(model: nn.Module, batches: Iterable, device: torch.device, precision: str = "fp32") -> None:
    """BatchNorm running statistics of ``model`` estimated again, as the equal-weight mean over ``batches`` (image
    batches, or tuples whose first item is one): torch's ``update_bn``, under the run's precision."""
    with autocast(device, precision):
        update_bn(batches, model, device)


def _table(scores: dict[str, dict]) -> pd.DataFrame:
    return pd.DataFrame([{"checkpoint": name, **values} for name, values in scores.items()])


def average(cfg: Config, fold: int, ema: bool = False, progress: bool = True) -> dict:
    """Average fold ``fold``'s kept epochs (``ema``: their EMA weights), re-estimate BatchNorm statistics on its
    training rows, score it beside best.pt and last.pt on its validation rows and write ``averaged.pt`` with its
    OOF scores. Returns the epochs averaged, each checkpoint's validation scores and the path written."""
    cfg = override(cfg, **{"model.pretrained": False})  # every weight comes from the kept files
    folder = RunFolder(cfg.run.dir)
    kept = folder.kept_epochs(fold)
    if not kept:
        raise PipelineError(f"{folder.fold(fold) / 'epochs'} holds no kept epoch weights: train fold {fold} with "
                            "train.keep_epochs=K (the last K epochs are kept) first")

    def kept_weights() -> Iterable[dict]:  # one file in memory at a time
        for path in kept.values():
            weights = load_checkpoint(path)["ema" if ema else "model"]
            if weights is None:
                raise PipelineError(f"--ema: {path} holds no EMA weights (trained with train.ema=false); average "
                                    "the raw weights (without --ema)")
            yield weights

    ensure_writable(folder.fold(fold), "the averaged checkpoint")
    with folder.lock(fold):
        weights = average_weights(kept_weights())
        parts = build_parts(cfg, fold, progress=False)
        cfg = parts.cfg  # resolved as training resolves it (data.num_classes from the vocabulary in csv/openimages)
        trainer = Trainer(parts, progress=False)
        model = parts.model
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            raise PipelineError(f"{folder.fold(fold)}: the kept weights do not fit this config's network "
                                f"(model.backbone={cfg.model.backbone}): run with the config the fold was trained "
                                f"with ({str(exc).splitlines()[0]})") from None
        if has_batchnorm(model):
            clean = RGBYDataset(parts.train_table, cfg.data.num_classes, cfg.data.image_size,
                                packed=open_packed(cfg.data, parts.train_table), channels=cfg.model.in_chans)
            loader = make_loader(clean, cfg.train.batch_size, cfg.train.num_workers, cfg.train.seed, parts.device)
            refresh_batchnorm(model, progress_bar(loader, desc="BatchNorm statistics", disable=not progress,
                                                  leave=False), parts.device, cfg.train.precision)
        averaged = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
        columns = [*SCORE_COLUMNS, *([cfg.train.monitor] if cfg.train.monitor not in SCORE_COLUMNS else [])]
        results = {AVERAGED: trainer.validate(model)}
        for name in ("best", "last"):
            path = folder.checkpoint(fold, name)
            if path.is_file():
                model.load_state_dict(model_weights(load_checkpoint(path)))
                results[name] = trainer.validate(model)
        scores = {name: {column: float(result[column]) for column in columns} for name, result in results.items()}
        epochs = list(kept)
        with Staging() as staging:
            write_scores(folder.oof(fold, AVERAGED), parts.val_table["Id"], results[AVERAGED]["probs"], staging)
            written = save_weights(folder.checkpoint(fold, AVERAGED),
                                   averaged_checkpoint(averaged, epochs, "ema" if ema else "raw", cfg.model_dump()),
                                   staging)
            staging.commit()
    if progress:
        print(f"fold {fold}: the {'EMA' if ema else 'raw'} weights of epochs {epochs} averaged"
              + (", BatchNorm statistics re-estimated on the training rows" if has_batchnorm(model) else ""))
        print(_table(scores).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(f"wrote {written} and {folder.oof(fold, AVERAGED)}; predict with it: predict.checkpoint=averaged")
    return {"fold": fold, "epochs": epochs, "weights": "ema" if ema else "raw", "scores": scores, "path": str(written)}


def main() -> None:
    parser = cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--fold", type=int, required=True, help="the fold whose kept epochs are averaged")
    parser.add_argument("--ema", action="store_true", help="average the kept EMA weights instead of the raw ones")
    args = parser.parse_args()
    average(config_from_args(args), args.fold, args.ema)


if __name__ == "__main__":
    run_cli(main)
