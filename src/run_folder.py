"""The run folder: the one module that knows its layout and the formats of what lives in it.

::

    run.dir/
      config.yaml                 resolved config of the last fold trained (also in each fold folder)
      fold<N>/
        last.pt, best.pt          full training state (best.pt: the epoch ``train.monitor`` liked best)
        epochs/epoch_<E>.pt       train.keep_epochs=K: the weights (raw and EMA) of the last K epochs, only
        averaged.pt               src.average: their mean, BatchNorm statistics re-estimated (weights only)
        oof.csv, oof_last.csv     validation scores of best.pt / last.pt (oof_averaged.csv: of averaged.pt):
                                  ``Id`` + one column per class
                                  (above 1 000 classes the same table as oof.npz: Ids + float16 scores,
                                  written by validation batch by batch as scores-*.tmp, then renamed)
        history.csv               one row per epoch
        config.yaml               resolved config of this fold's run
        pseudo_labels.json        with a data.extra source made by src.pseudo: that source's provenance (which
                                  prediction made its labels), copied from its <csv>.provenance.json by training
        label_embedding.npz       loss.name=label_embedding only: the fold's label vectors, and their plots
        label_similarity.png,     (written with it, by src.report)
        label_map.png
        .lock                     held (flock) by the process training this fold
      labels.csv                  the label vocabulary (index, code, name) every fold was trained with
      test_probs.csv              the ensemble's test scores (same table format as oof.csv)
      report/                     the prediction report (written by src.report)
      decision.json               the decision predict applied, with its config and the submission's hash
                                  (written by src.predict; its format is src.decision_record's)
      pseudo/                     src.pseudo's default output: pseudo_labels.csv and its .provenance.json
      lr_find/                    the learning-rate range test (src.lr_find): table and plot
      tune.db                     the hyperparameter studies (src.tune; optuna's SQLite storage, the default)
      tune/<study>/<trial>/       one run folder per trial (fold<tune.fold>/ as above); report/: the study report

Training writes it, prediction and the benchmarks read it; neither stage imports the other. Every write is
atomic (temp file + rename). What a checkpoint holds, and its saving and loading, is :mod:`src.checkpoint`'s,
and a score table's two forms and their reading and writing :mod:`src.score_table`'s; this module says where
they live.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from src.config import Config, DataConfig, PipelineError, RunRef, load_config, override
from src.data import Vocabulary
from src.files import folder_lock, save_config, write_atomic
from src.formats import get_format
from src.score_table import table_files

if TYPE_CHECKING:
    from src.losses import Scorer

CONFIG_FILE = "config.yaml"
VOCABULARY_FILE = "labels.csv"
HISTORY_FILE = "history.csv"
EMBEDDING_FILE = "label_embedding.npz"
TEST_SCORES_FILE = "test_probs.csv"
REPORT_DIR = "report"
LR_FIND_DIR = "lr_find"
TUNE_DIR = "tune"
TUNE_STORAGE_FILE = "tune.db"
LOCK_FILE = ".lock"
# The provenance of the data.extra sources made by src.pseudo, as the fold's training read it.
PSEUDO_FILE = "pseudo_labels.json"
PSEUDO_DIR = "pseudo"
# Beside a label csv made by src.pseudo: which prediction made it (read by training, copied into the fold folder).
PROVENANCE_SUFFIX = ".provenance.json"
# Validation scores of each checkpoint, so predict tunes thresholds on the model it applies them to.
OOF_FILES = {"best": "oof.csv", "last": "oof_last.csv", "averaged": "oof_averaged.csv"}
# train.keep_epochs' weights, one file per epoch, and src.average's checkpoint made from them.
EPOCHS_DIR = "epochs"
AVERAGED = "averaged"
# The label-embedding plots, beside the embedding they picture.
EMBEDDING_PLOTS = {"similarity": "label_similarity.png", "map": "label_map.png"}
# What a fold folder holds after training, in the order a summary lists them (and what train.overwrite removes).
FOLD_FILES = ("best.pt", "last.pt", OOF_FILES["best"], OOF_FILES["last"], HISTORY_FILE, CONFIG_FILE, EMBEDDING_FILE,
              *EMBEDDING_PLOTS.values(), PSEUDO_FILE)


class RunFolder:
    """Paths inside one experiment's run folder (``run.dir``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def fold(self, fold: int) -> Path:
        return self.root / f"fold{fold}"

    def checkpoint(self, fold: int, which: str = "last") -> Path:
        return self.fold(fold) / f"{which}.pt"

    def oof(self, fold: int, which: str = "best") -> Path:
        return self.fold(fold) / OOF_FILES[which]

    def epoch_weights(self, fold: int, epoch: int) -> Path:
        """Where ``train.keep_epochs`` keeps the weights of epoch ``epoch`` (1-based) of fold ``fold``."""
        return self.fold(fold) / EPOCHS_DIR / f"epoch_{epoch:02d}.pt"

    def kept_epochs(self, fold: int) -> dict[int, Path]:
        """Epoch -> its kept weights, oldest first, for every epoch fold ``fold`` keeps."""
        found = {}
        for path in (self.fold(fold) / EPOCHS_DIR).glob("epoch_*.pt"):
            number = path.stem.removeprefix("epoch_")
            if number.isdigit():
                found[int(number)] = path
        return dict(sorted(found.items()))

    def pseudo_record(self, fold: int) -> Path:
        """Where fold ``fold`` records the provenance of the pseudo-label sources it trained on."""
        return self.fold(fold) / PSEUDO_FILE

    def pseudo_labels(self, fold: int) -> list[dict]:
        """The provenance of each pseudo-label source fold ``fold`` trained on (none: an empty list)."""
        path = self.pseudo_record(fold)
        return json.loads(path.read_text()) if path.is_file() else []

    @property
    def pseudo(self) -> Path:
        """src.pseudo's default output folder."""
        return self.root / PSEUDO_DIR

    def history(self, fold: int) -> Path:
        return self.fold(fold) / HISTORY_FILE

    def embedding(self, fold: int) -> Path:
        return self.fold(fold) / EMBEDDING_FILE

    def embedding_plot(self, fold: int, which: str) -> Path:
        """Fold ``fold``'s plot ``which`` (``similarity``, ``map``) of its label embedding."""
        return self.fold(fold) / EMBEDDING_PLOTS[which]

    def config(self, fold: int | None = None) -> Path:
        return (self.root if fold is None else self.fold(fold)) / CONFIG_FILE

    def output_scorer(self, cfg: Config, fold: int) -> Scorer:
        """How fold ``fold``'s raw network outputs become per-class scores (``cfg``: the run's config): its loss's
        scorer (src.losses), with what the loss fitted at training (a label embedding) read from the fold folder."""
        # Imported here: the losses pull in torch, and the light commands that read run folders (src.submit)
        # must start without it.
        from src.losses import loss_kind

        kind = loss_kind(cfg.loss.name)
        if kind.load is None:  # the loss fitted nothing
            return kind.scorer(None)
        path = self.embedding(fold)
        if not path.is_file():
            raise PipelineError(f"{path} not found: a label-embedding run saves one per fold")
        return kind.scorer(kind.load(path))

    @property
    def vocabulary(self) -> Path:
        return self.root / VOCABULARY_FILE

    @property
    def test_scores(self) -> Path:
        return self.root / TEST_SCORES_FILE

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR

    @property
    def lr_find(self) -> Path:
        return self.root / LR_FIND_DIR

    @property
    def tune_storage(self) -> Path:
        return self.root / TUNE_STORAGE_FILE

    def tune_study(self, study: str) -> Path:
        """The folder of study ``study``: one run folder per trial, and the study's report."""
        return self.root / TUNE_DIR / study

    def tune_report(self, study: str) -> Path:
        """The report folder of study ``study`` (src.tune)."""
        return self.tune_study(study) / REPORT_DIR

    def tune_trial(self, study: str, number: int) -> Path:
        """Trial ``number``'s own run folder (its ``run.dir``)."""
        return self.tune_study(study) / str(number)

    def trained_folds(self, which: str = "best") -> dict[int, Path]:
        """Fold number -> checkpoint path, for every fold folder holding ``which``.pt."""
        found = {}
        for path in self.root.glob(f"fold*/{which}.pt"):
            number = path.parent.name.removeprefix("fold")
            if number.isdigit():
                found[int(number)] = path
        return dict(sorted(found.items()))

    def training_outputs(self, fold: int) -> list[Path]:
        """Every file a training of fold ``fold`` writes (checkpoints, both forms of its score tables, history,
        config, label embedding, kept epochs) and the averaged checkpoint made of them: what training the fold
        again from scratch removes first."""
        tables = [file for which in OOF_FILES for file in table_files(self.oof(fold, which))]
        derived = [*self.kept_epochs(fold).values(), self.checkpoint(fold, AVERAGED)]
        return list(dict.fromkeys([self.fold(fold) / name for name in FOLD_FILES] + tables + [self.embedding(fold)]
                                  + derived))

    def lock(self, fold: int):
        """Hold fold ``fold``'s folder for this training process (:func:`src.files.folder_lock`); a second
        training of the fold is refused, naming the pid."""
        return folder_lock(self.fold(fold), LOCK_FILE, "training process",
                           "let it finish or stop it, or train into another run.dir")

    def fold_checkpoints(self, folds: Sequence[int] | None, which: str) -> list[tuple[int, Path]]:
        """(fold, checkpoint) pairs: every trained fold, or exactly ``folds``; a missing one is an error."""
        found = self.trained_folds(which)
        wanted = list(found) if folds is None else list(folds)
        missing = [f for f in wanted if f not in found]
        if not found or missing:
            make = ("average them first (python -m src.average --fold N)" if which == AVERAGED
                    else "train them first (bash scripts/train_fold.sh N)")
            raise PipelineError(f"{self.root}: no {which}.pt for fold(s) {missing or 'any'}; {make}")
        return [(f, found[f]) for f in wanted]

    # -- the saved config -----------------------------------------------------------------------------
    def save_config(self, cfg: Config, fold: int, vocabulary: Vocabulary | None = None,
                    comment: str | None = None) -> None:
        """The resolved config, in the fold folder and at the run folder's top (``comment``: a line above it, such
        as the precision the run resolved and why), and the label vocabulary (which every fold of a run must
        share: their scores are averaged column by column)."""
        if vocabulary is not None:
            saved = self.load_vocabulary()
            if saved is not None and saved.codes != vocabulary.codes:
                raise PipelineError(f"{self.vocabulary}: this run's folds were trained on another label vocabulary "
                                    f"({len(saved)} labels; the data now gives {len(vocabulary)}); train into a new "
                                    "run.dir, or restore the data")
            self.save_vocabulary(vocabulary)
        save_config(cfg, self.config(fold), comment)
        save_config(cfg, self.config(), comment)
        # Which predictions made the pseudo-labels this fold trains on (predict copies them into decision.json).
        sources, record = source_provenance(cfg.data), self.pseudo_record(fold)
        if sources:
            write_atomic(record, lambda tmp: tmp.write_text(json.dumps(sources, indent=1) + "\n"))
        else:
            record.unlink(missing_ok=True)

    def save_vocabulary(self, vocabulary: Vocabulary) -> Path:
        """Write the label vocabulary (index, code, name), as :meth:`load_vocabulary` reads it."""
        frame = pd.DataFrame({"code": vocabulary.codes, "name": vocabulary.names})
        return write_atomic(self.vocabulary, lambda tmp: frame.to_csv(tmp, index_label="index"))

    def load_vocabulary(self) -> Vocabulary | None:
        """The label vocabulary the run was trained with; None for a run folder written before runs kept one
        (HPA: its classes are numbered)."""
        if not self.vocabulary.is_file():
            return None
        frame = pd.read_csv(self.vocabulary, dtype={"code": str, "name": str}, keep_default_na=False)
        return Vocabulary(tuple(frame["code"]), tuple(frame["name"]))

    def load_config(self) -> Config:
        """The config the run was trained with (never fetching pretrained weights: checkpoints hold them)."""
        path = self.config()
        if not path.is_file():
            raise PipelineError(f"{self.root} holds no trained run ({CONFIG_FILE} not found); "
                                "train it first (bash scripts/train_fold.sh N)")
        return override(load_config(path), **{"model.pretrained": False})


def provenance_path(csv: str | Path) -> Path:
    """Where the provenance of a label csv made by src.pseudo lies: beside it, ``<csv>.provenance.json``."""
    return Path(f"{csv}{PROVENANCE_SUFFIX}")


def source_provenance(data: DataConfig) -> list[dict]:
    """The provenance of each ``data.extra`` source that has one (``csv``: the source's csv as configured). A csv
    whose bytes are no longer those the provenance names is refused: its labels are not that prediction's."""
    found = []
    for extra in data.extra:
        path = provenance_path(extra.csv)
        if not path.is_file():
            continue
        try:
            provenance = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise PipelineError(f"{path} is not valid JSON ({exc}); run `python -m src.pseudo` again") from None
        if hashlib.sha256(Path(extra.csv).read_bytes()).hexdigest() != provenance.get("csv_sha256"):
            raise PipelineError(f"{extra.csv} changed since src.pseudo wrote it (its sha256 is not the one {path} "
                                "names): run `python -m src.pseudo` again, or remove that file if the labels are "
                                "your own now")
        found.append({"csv": extra.csv, **provenance})
    return found


def saved_vocabulary(folder: RunFolder) -> Vocabulary:
    """The label vocabulary run ``folder`` was trained with. A run folder from before runs kept one has the
    vocabulary its format fixes (hpa: the numbered classes); where the data makes it, it is lost."""
    vocabulary = folder.load_vocabulary()
    if vocabulary is None:
        data = folder.load_config().data
        vocabulary = get_format(data).fixed_vocabulary(data)
        if vocabulary is None:
            raise PipelineError(f"{folder.vocabulary} not found: a data.format={data.format} run keeps the labels it "
                                "was trained with there; train the run again")
    return vocabulary


def run_vocabulary(cfg: Config) -> Vocabulary:
    """The label vocabulary of the ensemble's runs (all must share it: scores are combined column by column)."""
    refs = [ref for ref in cfg.predict.runs or [RunRef(dir=cfg.run.dir)] if ref.dir is not None]
    if not refs:  # score tables only: their columns are checked against the labels the format fixes
        vocabulary = get_format(cfg.data).fixed_vocabulary(cfg.data)
        if vocabulary is None:
            raise PipelineError(f"predict.runs holds score tables only; with data.format={cfg.data.format} the labels "
                                "come from a run folder: list one in predict.runs too")
        return vocabulary
    found = {ref.dir: saved_vocabulary(RunFolder(ref.dir)) for ref in refs}
    first, vocabulary = next(iter(found.items()))
    for run_dir, other in found.items():
        if other.codes != vocabulary.codes:
            raise PipelineError(f"experiments {first} and {run_dir} were trained on different label vocabularies "
                                f"({len(vocabulary)} and {len(other)} labels): they cannot be ensembled")
    return vocabulary


def write_history(path: Path, rows: list[dict]) -> Path:
    frame = pd.DataFrame(rows)
    return write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))

