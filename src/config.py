"""Config as data: a typed schema, YAML files, dotted ``key=value`` overrides.

Every stage takes ``--config FILE`` plus overrides such as ``train.lr=3e-4``. Values are parsed as YAML
(``false``, ``0.5``, ``[0, 1]``; a key that takes a string keeps unquoted text as typed where YAML would turn
it into something else, such as ``|`` or ``no``) and the merged result is validated against the schema below: an
unknown key or a wrong type fails at once with a message naming the key and the closest valid one.

The model and training defaults are the main recipe's (``configs/hpa_nasnet512.yaml``: pretrained NASNet-A-Large,
EMA, 64 images per optimizer step; a test keeps them equal), so ``Config()`` is a recipe that is shipped, and a
config writes down where it departs from it (the demos: a small network from scratch, no EMA, one batch a step).
"""

from __future__ import annotations

import difflib
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG = "configs/hpa_nasnet512.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExtraSource(Section):
    """An extra training source (e.g. the external HPAv18 set): its own csv and image folder, per-channel
    images ``<Id>_<channel>.<ext>`` of any size (a JPEG may be RGB-encoded grey: read as grey)."""

    csv: str
    images: str
    ext: Literal["png", "jpg"] = "png"
    # folds: its rows join the folds like the competition's. train_only: trained on in every fold and never
    # validated on (the folds file gives them no fold); validation, OOF, thresholds and the report see the
    # competition's rows only (1st place HPA trained on the external HPAv18 images this way: docs/winners.md).
    role: Literal["folds", "train_only"] = "folds"


class DataConfig(Section):
    # The dataset layout (src.data reads each):
    # - hpa: Id,Target csv with class indices, per-channel images <Id>_<red|green|blue|yellow>.png;
    # - openimages: image-level labels ImageID,Source,LabelName,Confidence (positives: Confidence 1), label ids
    #   such as /m/0abc, images <ImageID>.jpg of any size, submission image_id,labels (Inclusive Images);
    # - csv: an id column and a label column of space-separated label names, one image file per row (any
    #   channel count: model.in_chans must match), submission in the sample submission's columns.
    # For openimages and csv the label vocabulary is built from the training data (and data.trainable_labels),
    # saved with the run and used unchanged by prediction; data.num_classes is then taken from it.
    format: Literal["hpa", "openimages", "csv"] = "hpa"
    dir: str = "input/hpa"
    train_csv: str = "train.csv"
    sample_submission: str = "sample_submission.csv"
    train_images: str = "train"
    test_images: str = "test"
    extra: list[ExtraSource] = []
    # A labelled source in the test domain (csv + images, as an extra source): it never trains and never joins
    # the folds; predict scores it and fits the decision, ensemble weights and stacking on it (docs/prediction.md).
    holdout: ExtraSource | None = None
    num_classes: int | None = Field(28, ge=1)
    # csv format: the id and label columns of the train csv and sample submission (label names separated by
    # data.label_separator), and an optional column with each image's file name under the image folder
    # (default: <id><data.image_ext>).
    id_column: str = "image"
    label_column: str = "labels"
    # On the command line the text is taken as typed (data.label_separator=| is a '|', not YAML's block scalar).
    label_separator: str = Field(" ", min_length=1)
    path_column: str | None = None
    image_ext: str = ".jpg"
    # openimages format: the label id -> display name csv, and the list of trainable label ids (optional:
    # without it every positive label of the training data is trainable). Both relative to data.dir.
    class_descriptions: str | None = None
    trainable_labels: str | None = None
    image_size: int = Field(512, ge=8)
    # Stored image side length; None means "whatever most images of a source have".
    source_size: int | None = None
    # Where `python -m src.pack` writes the packed uint8 arrays (one per source, at data.image_size) that
    # training and prediction read instead of decoding images, when they are there; null: never use a cache.
    # One folder per dataset (outside data.dir, which may be read-only).
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _classes_known(self) -> DataConfig:
        if self.format == "hpa" and self.num_classes is None:
            raise ValueError("data.num_classes is required for data.format=hpa (openimages and csv take it from "
                             "the training labels)")
        return self


class FoldsConfig(Section):
    n_splits: int = Field(5, ge=2)
    seed: int = 42
    path: str = "input/folds.csv"
    group_duplicates: bool = False
    # Max Hamming distance between perceptual hashes of the green channel that counts as a duplicate.
    duplicate_distance: int = Field(4, ge=0)
    # Samples sharing a value of this column never span two folds (1st place HPA split by antibody): a column of
    # the training label csv(s), or of folds.group_csv when set (a csv with Id and this column). Composes with
    # group_duplicates (a group is a connected component of both). null: no grouping by column.
    group_column: str | None = None
    group_csv: str | None = None
    # Where `python -m src.duplicates` writes the near-duplicate pairs between the training sources and the test
    # set (predict.overrides reads it).
    duplicates_path: str = "input/duplicates.csv"
    # What to do with a class that has fewer samples than folds: fail, or keep going and warn.
    rare_classes: Literal["error", "warn"] = "error"
    # The stratifier: iterstrat (MultilabelStratifiedKFold on a dense matrix; ~40 s at 100k x 500, and the
    # dense 1.7 M x 7 178 matrix alone would be 12 GB), fast (src.folds.stratify_sparse: the same iterative
    # stratification on a sparse matrix, 1.7 M x 7 178 in ~13 s on 2 cores), or auto: iterstrat up to
    # src.folds.AUTO_ITERSTRAT_MAX_CELLS samples x classes (HPA), fast above.
    method: Literal["auto", "iterstrat", "fast"] = "auto"

    @model_validator(mode="after")
    def _group_csv_needs_a_column(self) -> FoldsConfig:
        if self.group_csv is not None and self.group_column is None:
            raise ValueError("folds.group_csv is set but folds.group_column is not: name the column to group by")
        return self


class ModifierConfig(Section):
    """The feature modifier between backbone and head (learned gating plus feature dropout)."""

    gate_reduction: int = Field(4, ge=1)
    feature_dropout: float = Field(0.2, ge=0.0, lt=1.0)


class ModelConfig(Section):
    backbone: str = "nasnetalarge"
    # false: random init; true: timm's hub weights; a path: a local weights file.
    pretrained: bool | str = True
    in_chans: int = Field(4, ge=1)
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    modifier: ModifierConfig = ModifierConfig()
    channels_last: bool = False
    # Recompute activations in the backward pass instead of storing them (less memory, more compute): timm's
    # set_grad_checkpointing where the backbone has it, else per cell (NASNet, PNASNet: src.model).
    grad_checkpointing: bool = False
    # torch.compile the training forward and backward (the first steps compile, minutes for a big backbone;
    # validation and prediction run eager). For long GPU runs; off on CPUs, where compiling outweighs the gain.
    compile: bool = False


class AugmentConfig(Section):
    """The training augmentation policy (src.augment), any channel count; probabilities of 0 switch a part off."""

    d4: float = Field(1.0, ge=0.0, le=1.0)
    shift_scale_rotate: float = Field(0.5, ge=0.0, le=1.0)
    brightness_contrast: float = Field(0.3, ge=0.0, le=1.0)
    gamma: float = Field(0.3, ge=0.0, le=1.0)
    crop_scale: float = Field(1.0, gt=0.0, le=1.0)
    # Where the policy runs: "loader" per sample in the DataLoader workers (CPU, albumentations); "device" on
    # each batch on the training device (torch), leaving the workers only reading, for when CPU cores are few.
    # The same parameters from the same per-sample seeds either way.
    where: Literal["loader", "device"] = "loader"
    # Random crops of this many px from the stored image (data.image_size), at native resolution, never resized
    # back: pack at a large size (data.image_size=1024) and train on crops (512) of it; validation and prediction
    # see the whole image (the backbones are fully convolutional) or predict.crops views. Null: no crop (HPA 1st
    # place, bestfitting, trained on random crops; docs/winners.md).
    crop: int | None = Field(None, ge=8)
    # Mixing of training samples on the device, after the policy (src.augment.BatchMix): "mixup" blends each
    # image with another of its batch, "cutmix" pastes a box of another; the targets mix with the same weight
    # (cutmix: the box's area share). A batch is mixed with probability mix_prob, its weight drawn from
    # Beta(mix_alpha, mix_alpha), from its samples' seeds (a resumed run mixes the same way).
    mix: Literal["none", "mixup", "cutmix"] = "none"
    mix_prob: float = Field(0.5, ge=0.0, le=1.0)
    mix_alpha: float = Field(1.0, gt=0.0)


class TrainConfig(Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1)
    accum_steps: int = Field(8, ge=1)
    # Images per optimizer step over all processes; when set, accum_steps is derived from it
    # (global_batch / (batch_size x processes)), so changing the batch or the GPU count keeps the step.
    global_batch: int | None = Field(64, ge=1)
    lr: float = Field(3e-4, gt=0.0)
    # Learning rate of a pretrained backbone (fine-tuning); None means train.lr. A backbone trained from
    # scratch (model.pretrained=false) has no features to protect and trains at train.lr.
    backbone_lr: float | None = 1e-4
    weight_decay: float = Field(1e-4, ge=0.0)
    # Settings relative to the schedule, so one config behaves alike at 300 optimizer steps and at 15 000:
    # linear warm-up over this fraction of all optimizer steps, then cosine decay to zero.
    warmup_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    clip_grad: float | None = 5.0
    # auto: the device's (src.model.resolve_precision): bf16 on CUDA cards of compute capability 8.0+ and CPUs
    # with native bf16 kernels, fp16 with a loss scaler on older CUDA cards (T4, V100, P100), fp32 elsewhere. An
    # explicit bf16 on an older card runs fp16, with a warning. The run's config.yaml holds what it used, and why.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(8, ge=0)
    seed: int = 42
    # Continue a fold from its last.pt. Without it a fold folder that holds checkpoints is refused, unless
    # train.overwrite=true: then that fold's training outputs are removed and it trains again from scratch.
    resume: bool = False
    overwrite: bool = False
    ema: bool = True
    # EMA time constant as a fraction of all optimizer steps: decay = 1 - 1 / (ema_horizon * steps), reached
    # after timm's EMA warm-up (power 1: the plain mean of all steps so far until then). Validation scores the
    # raw and the EMA weights; the better one is checkpointed and used by predict.
    ema_horizon: float = Field(0.1, gt=0.0, le=1.0)
    # What picks best.pt: macro-F1 at 0.5 or at per-class tuned thresholds, validation loss, or "metric": the
    # competition metric (metric.name, e.g. per-image F2) at the best global threshold with predict.min_labels..
    # predict.max_labels labels per image (the global_bounded decision).
    monitor: Literal["macro_f1", "macro_f1_tuned", "val_loss", "metric"] = "macro_f1_tuned"
    # Warn (console, history, W&B) when, from this epoch on, validation is no better than the prior predictor
    # (every class at its training rate) in loss or tuned macro-F1: the model learned nothing. 0: never.
    warn_no_learning_after: int = Field(2, ge=0)
    # Also checkpoint every N optimizer steps inside an epoch (0: at epoch ends only).
    checkpoint_every_steps: int = Field(500, ge=0)
    # Processes to train with (scripts/train_fold.sh launches torchrun when more than one): "auto" is the
    # number of visible GPUs, 1 on a CPU. train.batch_size is per process.
    nproc: int | Literal["auto"] = "auto"
    # Under DDP on GPUs: BatchNorm statistics over the global batch instead of each process's.
    sync_batchnorm: bool = False
    # Stop after this many optimizer steps in total, as if interrupted: last.pt is written and
    # train.resume=true continues from there (smoke runs, and the resume tests). None: run all epochs.
    stop_after_steps: int | None = Field(None, ge=1)
    # Which samples an epoch draws (src.dataset.EpochSampler): "uniform", each sample once in a shuffled order;
    # "rare", as many draws with replacement, sample i weighted (1 / frequency of its rarest label) **
    # sampler_power (a row without labels: the frequency of such rows). Power 0 is the uniform sampler itself.
    sampler: Literal["uniform", "rare"] = "uniform"
    sampler_power: float = Field(0.5, ge=0.0)
    # Stop cleanly before this much time has passed since training started (seconds, or a time with units such as
    # 8h30m): at an optimizer step, once the next step window (and an epoch's validation when one is due) would not
    # fit, as measured so far this session; last.pt is written and train.resume=true continues exactly (a Kaggle
    # session's limit; see docs/gpus.md). None: no limit.
    time_limit: float | None = Field(None, gt=0.0)
    augment: AugmentConfig = AugmentConfig()
    # Keep the weights (raw, and EMA when kept) of the last K epochs in fold<N>/epochs/, for `python -m src.average`
    # (checkpoint averaging with BatchNorm statistics re-estimated; HPA 3rd place). 0: keep none.
    keep_epochs: int = Field(0, ge=0)

    @field_validator("time_limit", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return parse_duration(value, "train.time_limit")
            except PipelineError as exc:
                raise ValueError(str(exc)) from None
        return value


# The losses of src.losses.LOSSES (a test keeps the two the same), each with whether it mixes with the others
# (on per-class logits) or stands alone: named here so that a config is checked without importing torch.
LOSS_NAMES = {"bce": True, "focal": True, "soft_f1": True, "lovasz": True, "symmetric_lovasz": True, "hard_bce": True,
              "label_embedding": False}


def loss_terms(name: str) -> list[tuple[float, str]]:
    """``loss.name`` as weighted terms: ``"0.5*bce+soft_f1"`` -> ``[(0.5, "bce"), (1.0, "soft_f1")]``, a loss
    that stands alone -> ``[(1.0, name)]``; an unknown name (with the closest known one), a malformed term, or a
    loss that stands alone inside a mix is a ValueError."""
    if LOSS_NAMES.get(name) is False:
        return [(1.0, name)]
    mixable = sorted(key for key, mixes in LOSS_NAMES.items() if mixes)
    alone = " or ".join(repr(key) for key, mixes in LOSS_NAMES.items() if not mixes)
    terms = []
    for part in name.replace(" ", "").split("+"):
        match = re.fullmatch(r"(?:((?:\d+\.?\d*|\.\d+)(?:[eE]-?\d+)?)\*)?([a-z_0-9]+)", part)
        if not match or match.group(2) not in mixable:
            close = difflib.get_close_matches(match.group(2) if match else part, mixable, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{part!r} in {name!r} is not a loss{hint}; choose from {mixable}, optionally "
                             f"weighted and mixed, e.g. '0.5*bce+soft_f1', or {alone} alone")
        terms.append((float(match.group(1) or 1.0), match.group(2)))
    return terms


class LossConfig(Section):
    # A loss name or a weighted mix, e.g. "bce", "soft_f1", "bce+soft_f1", "0.5*bce+soft_f1";
    # or "label_embedding" alone: PMI -> SVD label vectors, cosine-proximity regression, nearest-label decoding.
    # Checked against LOSS_NAMES when the config is validated, not first when training builds the loss.
    name: str = "bce+soft_f1"
    focal_gamma: float = Field(2.0, ge=0.0)
    # hard_bce: the share of a batch's label terms (samples x classes) whose BCE is averaged, the largest first.
    hard_fraction: float = Field(0.5, gt=0.0, le=1.0)
    # label_embedding: embedding dimension k (capped at the number of classes), positive PMI (negative and
    # never-co-occurring pairs set to 0), and a pseudo-count added to each label's count (rare labels).
    embedding_dim: int = Field(300, ge=2)
    pmi_positive: bool = True
    pmi_smoothing: float = Field(0.0, ge=0.0)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        loss_terms(name)
        return name


class RunConfig(Section):
    dir: str = "runs/hpa_nasnet512"


class ScorePair(Section):
    """Score tables made elsewhere (a teammate, another repo), in the run folder's format (src.score_table): ``Id``
    + one column per class (named by class index or by label code), csv or our npz. ``oof``: out-of-fold scores of
    training Ids (their folds are read from ``folds.path``); ``test``: every test Id; ``holdout``: every
    ``data.holdout`` Id (required when there is a holdout)."""

    oof: str
    test: str
    holdout: str | None = None


class RunRef(Section):
    """One experiment of an ensemble: its run folder (or a pair of score tables made elsewhere) and its weight."""

    dir: str | None = None
    scores: ScorePair | None = None
    weight: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _one_source(self) -> RunRef:
        if (self.dir is None) == (self.scores is None):
            raise ValueError("a predict.runs entry names either dir (a run folder) or scores ({oof, test} tables)")
        return self

    @property
    def name(self) -> str:
        """The run folder, or the OOF table of a score pair: how the report and logs name the run."""
        return self.dir if self.dir is not None else self.scores.oof


class PredictConfig(Section):
    # Experiments to ensemble; empty means just run.dir.
    runs: list[RunRef] = []
    # Fold numbers to use; None means every fold checkpoint found.
    folds: list[int] | None = None
    # averaged: the fold's averaged.pt (python -m src.average) and its own OOF scores.
    checkpoint: Literal["best", "last", "averaged"] = "best"
    # D4 views: identity, rot90, rot180, rot270, flip, flip_rot90, flip_rot180, flip_rot270.
    tta: list[str] = ["identity", "flip"]
    tta_reduce: Literal["mean", "max"] = "mean"
    # Crop views: a k x k grid of train.augment.crop px crops (N = k * k: 1 is the central crop, 4 the corners),
    # each under every TTA view, all reduced by tta_reduce; 0: the whole image. Needs a run trained on crops.
    crops: int = Field(0, ge=0)
    # Re-score each fold's validation rows under the same TTA views, so thresholds are tuned on scores made
    # like the test scores (training's OOF is one view; matters most with tta_reduce=max). One more pass
    # over the training set.
    oof_tta: bool = False
    # The decision strategy applied to test (all are compared in the report, see src.thresholds); auto: the one
    # with the best cross-fold OOF estimate, a tie going to the simpler strategy.
    threshold: Literal["auto", "fixed", "oof_f1", "rate", "global_oof", "top_k", "global_bounded"] = "auto"
    fixed_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    # oof_f1: final = shrink * tuned + (1 - shrink) * (the global_oof threshold); below 1 it guards against
    # overfitting the tuned thresholds to a small OOF set. (HPA's 2nd place multiplied every tuned threshold by 0.7
    # instead: a uniform scaling, not this blend.)
    shrink: float = Field(1.0, gt=0.0, le=1.0)
    # oof_f1: classes with fewer OOF positives than this take the global_oof threshold.
    min_positives: int = Field(5, ge=1)
    # Labels per image after thresholding: rows with fewer get their highest-scoring labels added, rows with
    # more keep their highest-scoring ones (every strategy but top_k). At least 1 (HPA's rule): the submission
    # check refuses empty rows. max_labels null: no cap. top_k tunes its k in 1..max_labels (or a cap from the
    # OOF label counts).
    min_labels: int = Field(1, ge=1)
    max_labels: int | None = Field(None, ge=1)
    # rate: csv "class,rate" overriding the train label rates.
    rate_table: str | None = None
    batch_size: int = Field(16, ge=1)
    # How the runs' scores become one (src.ensemble): hand: runs[].weight (the weighted mean); equal: every run
    # weight 1; search: non-negative weights maximising the metric after the decision strategy on OOF (on
    # data.holdout when there is one); auto: the best cross-fold estimate of these (and of stack when set), a tie
    # going to the simpler. Every way but hand is compared in the report (ensembles.csv).
    weights: Literal["hand", "equal", "search", "auto"] = "hand"
    # search: one weight per run and class (each class's best F-beta) instead of one per run.
    weights_per_class: bool = False
    # logistic: per class a logistic regression over the runs' scores of that class, fitted with nested folds
    # (applied as named unless predict.weights=auto picks among all ways).
    stack: Literal["none", "logistic"] = "none"
    # stack: every class's mean score is an input of each class's model too (label co-occurrence).
    stack_other_classes: bool = False
    # Write a submission that looks degenerate (the same labels on nearly every row, or predicted label rates
    # far from the training rates on most classes) instead of stopping with exit 2. Also: predict --force.
    force: bool = False
    # A test image that is a near-duplicate of a labelled image (folds.duplicates_path, written by
    # `python -m src.duplicates`) takes that image's labels instead of the decision's (1st place HPA).
    overrides: bool = False

    @model_validator(mode="after")
    def _label_bounds(self) -> PredictConfig:
        if self.max_labels is not None and self.max_labels < self.min_labels:
            raise ValueError(f"predict.max_labels ({self.max_labels}) is below predict.min_labels "
                             f"({self.min_labels})")
        return self


class MetricConfig(Section):
    """The competition metric: the threshold strategies are tuned and compared by it, the report shows it."""

    # macro_f1: mean over classes of each class's F1 (HPA). fbeta_samples: mean over images of each image's
    # F-beta (Inclusive Images and iMet: F2). micro_f1: F1 of all (image, label) pairs pooled.
    # precision_at_k: mean over images of the share of its k highest-scoring labels that are true; it ranks
    # scores and so does not depend on the decision strategy.
    # The choices are src.metrics.METRICS (checked below): registering a metric there is all a new one needs.
    name: str = "macro_f1"
    # fbeta_samples: beta > 1 weighs recall above precision (2: F2).
    beta: float = Field(2.0, gt=0.0)
    # precision_at_k: k labels per image.
    k: int = Field(1, ge=1)
    # The score of an image (fbeta_samples) or class (macro_f1), or of everything (micro_f1), with no true
    # and no predicted label, as scikit-learn's zero_division.
    zero_division: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from src.metrics import METRICS  # metrics imports this module: look it up when a config is checked

        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; expected one of {sorted(METRICS)}")
        return name


class SubmissionConfig(Section):
    path: str = "submissions/submission.csv"


class WandbConfig(Section):
    mode: Literal["disabled", "offline", "online"] = "offline"
    project: str = "multilabel-pipeline"
    entity: str | None = None
    # The run's W&B group and name; null: the run folder's name, and "<run folder>-fold<N>" (src.tune sets the
    # study as the group and "<study>-trial<N>" as the name of each trial).
    group: str | None = None
    name: str | None = None


class RungConfig(Section):
    """One rung of the budgeted search's fidelity ladder (``python -m src.tune --budget``)."""

    image_size: int = Field(ge=8)  # px, as data.image_size
    epochs: float = Field(gt=0.0, le=1.0)  # a share of train.epochs, rounded up, at least 1 epoch


class TuneConfig(Section):
    """Hyperparameter search (``python -m src.tune``): every trial trains fold ``tune.fold`` and reports its
    monitored validation score (``train.monitor``) after each epoch, one pruning step per epoch."""

    fold: int = Field(0, ge=0)
    # Stops a trial whose score at an epoch is worse than the finished trials' at that epoch: median (worse than
    # their median), percentile (worse than tune.percentile of them), hyperband (successive halving over
    # epochs, optuna's HyperbandPruner), none (every trial runs all epochs).
    pruner: Literal["median", "percentile", "hyperband", "none"] = "median"
    # median/percentile: finished trials before any trial is pruned, and epochs every trial trains before it can
    # be pruned (0: from the first epoch on).
    n_startup_trials: int = Field(4, ge=0)
    n_warmup_steps: int = Field(1, ge=0)
    # percentile: the share (in %) of trials kept at each epoch.
    percentile: float = Field(25.0, gt=0.0, lt=100.0)
    # tpe: random trials first (tune.random_trials), then optuna's TPE model; random: random trials only.
    sampler: Literal["tpe", "random"] = "tpe"
    random_trials: int = Field(5, ge=1)
    # Sampler seed; null: a fresh one per process (processes sharing a study must not repeat each other's draws).
    seed: int | None = None
    # A running trial records a heartbeat this often; one silent for twice as long (its process was killed) is
    # marked FAIL by the next tuner of the study and never counted.
    heartbeat_seconds: int = Field(30, ge=1)
    # --budget: successive halving over this ladder of fidelities, cheapest rung first ({image_size, epochs} each);
    # null: 1/2, 3/4 and all of data.image_size (multiples of 8, at least 32 px) with 1/3, 2/3 and all of
    # train.epochs. The best 1/eta of a rung's trials go on to the next rung.
    ladder: list[RungConfig] | None = None
    eta: int = Field(3, ge=2)


class KaggleConfig(Section):
    """The Kaggle round trip (``python -m src.submit``) and the inference bundle (``python -m src.bundle``)."""

    # The competition's slug, as in kaggle.com/competitions/<slug>.
    competition: str = "human-protein-atlas-image-classification"
    # One row per submission attempt (append-only); the resolved configs go beside it in configs/<hash>.yaml,
    # the OOF-vs-leaderboard plot in oof_vs_lb.png.
    log: str = "submissions/log.csv"
    # The bundle's Kaggle dataset "owner/slug" (dataset-metadata.json's id); null: "<run folder>-bundle" under a
    # placeholder owner to replace before `kaggle datasets create`.
    dataset: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+/[a-z0-9-]{5,50}$")


class Config(Section):
    data: DataConfig = DataConfig()
    folds: FoldsConfig = FoldsConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    loss: LossConfig = LossConfig()
    run: RunConfig = RunConfig()
    predict: PredictConfig = PredictConfig()
    metric: MetricConfig = MetricConfig()
    submission: SubmissionConfig = SubmissionConfig()
    wandb: WandbConfig = WandbConfig()
    tune: TuneConfig = TuneConfig()
    kaggle: KaggleConfig = KaggleConfig()

    @model_validator(mode="after")
    def _crop_fits(self) -> Config:
        crop = self.train.augment.crop
        if crop is not None and crop > self.data.image_size:
            raise ValueError(f"train.augment.crop ({crop}) is larger than the stored images (data.image_size="
                             f"{self.data.image_size})")
        return self


class PipelineError(Exception):
    """A problem the user can fix (bad config, bad data): shown as one message, exit code 2."""


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}
DURATION_PART = r"(\d+(?:\.\d*)?|\.\d+)([smh])"


def parse_duration(text: str, what: str) -> float:
    """The seconds of a time written with its units: ``90s``, ``30m``, ``1.5h``, ``8h30m`` (``what`` names the
    option or key in the error)."""
    spelled = str(text).strip().lower()
    seconds = sum(float(number) * DURATION_UNITS[unit] for number, unit in re.findall(DURATION_PART, spelled))
    if not re.fullmatch(f"(?:{DURATION_PART})+", spelled) or seconds <= 0:
        raise PipelineError(f"{what} {text!r}: expected a positive time with its unit, e.g. 90s, 30m, 1.5h or 8h30m")
    return seconds


class ConfigError(PipelineError):
    """A config file or override that does not fit the schema; ``problems`` lists each problem on its own."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_valid_keys(annotation, key + "."))
    return keys


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, _valid_keys(Config), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown config key '{key}'{hint}"
    if not key:  # a check across sections (Config's own validator): its message names the keys
        return str(error["msg"]).removeprefix("Value error, ")
    return f"config key '{key}': {error['msg']} (got {error.get('input')!r})"


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _accepted_types(key: str) -> set[type]:
    """The Python types the schema accepts at dotted ``key`` (a Literal's values' types; empty when the key is
    unknown or a section)."""
    model: type[BaseModel] = Config
    *sections, name = key.split(".")
    for part in sections:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return set()
        model = field.annotation
    field = model.model_fields.get(name)
    pending, accepted = [field.annotation] if field else [], set()
    while pending:
        annotation = pending.pop()
        origin = get_origin(annotation)
        if origin is Literal:
            accepted |= {type(value) for value in get_args(annotation)}
        elif origin in (Union, types.UnionType):
            pending += get_args(annotation)
        elif isinstance(annotation, type):
            accepted.add(origin or annotation)
    return accepted


def _override_value(key: str, raw: str) -> Any:
    """An override's value: ``raw`` parsed as YAML; for a key that takes a string, ``raw`` itself where YAML
    would make something else of unquoted text (``|`` is a YAML block scalar: '', ``no`` a bool, ``@`` an
    error) and the key takes no such value. Quoted text is YAML's to unquote."""
    accepted = _accepted_types(key)
    keep_raw = str in accepted and not raw.strip().startswith(("'", '"'))
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        if keep_raw:
            return raw
        raise ConfigError(f"override '{key}={raw}': value is not valid YAML ({exc})") from exc
    if keep_raw and (value != raw.strip() if isinstance(value, str) else type(value) not in accepted):
        return raw
    return value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["train.lr=1e-3", "model.pretrained=false"]`` into a nested dict of YAML-typed values (a key that
    takes a string keeps the text as typed where YAML would change it: see :func:`_override_value`)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        _set_dotted(tree, key.strip(), _override_value(key.strip(), raw))
    return tree


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(tree: dict) -> Config:
    """Validate a nested dict against the schema; all problems are reported at once."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems), problems) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema defaults <- YAML file <- dotted overrides, validated."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    tree = _merge(tree, parse_overrides(overrides or []))
    return build_config(tree)


def flatten(tree: dict, prefix: str = "") -> dict:
    """A config tree (``Config.model_dump()``) as ``{dotted key: value}``: the keys overrides and messages use."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def flatten_saved(tree: dict) -> dict:
    """A config saved by an earlier version, flattened, with the keys it lacks at today's schema defaults: a new
    key's default keeps the old behaviour, so a saved run or study is not "changed" by a key added since."""
    return flatten(Config().model_dump(mode="json")) | flatten(tree)


def override(cfg: Config, **changes: Any) -> Config:
    """A copy of ``cfg`` with dotted keys changed, e.g. ``override(cfg, **{"train.epochs": 1})``."""
    tree = cfg.model_dump()
    for key, value in changes.items():
        _set_dotted(tree, key, value)
    return build_config(tree)
