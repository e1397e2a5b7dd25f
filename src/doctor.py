"""Check a machine before a long run: what it has, what the config will use, and (``--estimate``) how long it takes.

    python -m src.doctor [--config FILE] [key=value ...]
    python -m src.doctor [--config FILE] [key=value ...] --estimate [--max-batch N] [--steps N] [--images N]

Prints, one part after another: the torch, CUDA and cuDNN versions; each GPU (name, compute capability, memory)
and whether this torch build has kernels for it (``torch.cuda.get_arch_list()``), with the install command that
fixes it when it has none; the precision ``train.precision`` resolves to on the training device, and why
(:func:`src.model.resolve_precision`); the data's label files and image folders, the folds file, the packed cache
and the pretrained weights, found or missing; the W&B mode; the kaggle CLI and whether credentials are set up
(their presence only: no key is read or printed). Lines start with ``ok``, ``--`` (not used, or not needed) or
``!!`` (missing or wrong).

``--estimate`` runs real training steps of the resolved config on its device: the fold's parts as training builds
them (:func:`src.train.build_parts`: network, loss, AdamW, schedule, GradScaler, EMA) driven by the training
loop itself (:meth:`src.train.Trainer.train_epoch`, one optimizer step per batch), on synthetic uint8 batches of
the configured size and channels (a stand-in label table of the data's class count lets the parts be built
without reading any image). It starts at ``train.batch_size`` and doubles the batch until the device runs out of
memory or ``--max-batch`` is passed (halving instead when the configured batch does not fit), then prints each
tried batch's seconds per step, images/s and peak memory, and for the largest that fits: the time of an epoch,
a fold (``train.epochs``) and all folds (``folds.n_splits``), and the accumulation that keeps
``train.global_batch``. Data loading, CPU augmentation and validation are not included.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from src.cli import cli_parser, config_from_args, run_cli
from src.config import Config, PipelineError, override
from src.data import test_source, train_sources
from src.folds import read_folds_file
from src.formats import DemoLabels, get_format, load_training_data
from src.model import resolve_device, resolve_precision
from src.pack import PACK_HINT, describe, find_cache
from src.submit import find_kaggle
from src.train import Trainer, build_parts

GIB = 2**30
OK, NOT_USED, PROBLEM = "ok", "--", "!!"
# The last torch CUDA build line that still ships kernels for Maxwell, Pascal and Volta (sm_50, sm_60, sm_70):
# PyTorch's CUDA 12.8 builds dropped them (Maxwell and Pascal from 2.8: pytorch/pytorch#157517; Volta from 2.11:
# pytorch/pytorch#172352), and CUDA 13 cannot build for them. Up to torch 2.14 the CUDA 12.6 wheels keep
# sm_50..sm_90 (2.15 plans to drop them: pytorch/pytorch#190385).
LEGACY_INDEX = "https://download.pytorch.org/whl/cu126"
NEWEST_INDEX = "https://download.pytorch.org/whl/cu130"


def line(status: str, text: str) -> str:
    """One report line: its status mark, then the text."""
    return f"  {status} {text}"


# -- versions and devices ---------------------------------------------------------------------------------------
def versions() -> list[str]:
    """Python, torch (with the CUDA and cuDNN it was built with) and timm."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
    cudnn_text = f"cuDNN {cudnn // 10000}.{cudnn // 100 % 100}.{cudnn % 100}" if cudnn else "no cuDNN"
    return [line(OK, f"python {platform.python_version()}, torch {torch.__version__} ({cuda}, {cudnn_text}), "
                     f"timm {timm.__version__}")]


def _arch_number(arch: str) -> tuple[str, int]:
    """``sm_86`` -> ("sm", 86); ``compute_90`` -> ("compute", 90); ``sm_90a`` -> ("sm", 90)."""
    kind, _, number = arch.partition("_")
    return kind, int(re.sub(r"\D+$", "", number))


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a build with kernels for ``arch_list`` runs on a card of ``capability``: a cubin ``sm_XY`` runs on
    capability X.Y and later minors of the same major; PTX ``compute_XY`` is compiled for any capability from
    X.Y on (NVIDIA's compatibility rules)."""
    card = capability[0] * 10 + capability[1]
    for arch in arch_list:
        kind, number = _arch_number(arch)
        if kind == "sm" and number // 10 == capability[0] and number <= card:
            return True
        if kind == "compute" and number <= card:
            return True
    return False


def arch_fix(capability: tuple[int, int], arch_list: list[str], torch_version: str) -> str:
    """The one-line fix for a torch build without kernels for a card of ``capability``."""
    release = torch_version.split("+")[0]
    oldest = min((_arch_number(arch)[1] for arch in arch_list), default=0)
    if capability[0] * 10 + capability[1] < oldest:
        return (f"pip install torch=={release} --index-url {LEGACY_INDEX} (with the torchvision of that release): "
                "the CUDA 12.6 builds still ship sm_50/sm_60/sm_70, CUDA 12.8+ and 13 builds start at sm_75; on "
                "Kaggle keep the torch the notebook image comes with")
    return (f"pip install torch=={release} --index-url {NEWEST_INDEX} (with the torchvision of that release): a "
            "build for a newer CUDA has kernels for newer cards")


def gpus() -> list[str]:
    """Each CUDA device: name, compute capability, memory, and whether this torch build has kernels for it."""
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        return [line(NOT_USED, f"no GPU ({why}): training runs on the CPU")]
    arch_list = torch.cuda.get_arch_list()
    lines = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        capability = torch.cuda.get_device_capability(index)
        text = (f"GPU {index}: {props.name}, compute capability {capability[0]}.{capability[1]}, "
                f"{props.total_memory / GIB:.1f} GiB")
        if arch_supported(capability, arch_list):
            lines.append(line(OK, f"{text}; this torch build has kernels for it"))
        else:
            lines.append(line(PROBLEM, f"{text}; this torch build has NO kernels for sm_{capability[0]}"
                                       f"{capability[1]} (it has {' '.join(arch_list)}). Fix: "
                                       f"{arch_fix(capability, arch_list, torch.__version__)}"))
    return lines


def precision(cfg: Config) -> list[str]:
    """The device ``train.device`` resolves to and the precision ``train.precision`` resolves to on it, and why."""
    try:
        device = resolve_device(cfg.train.device)
    except PipelineError as exc:
        return [line(PROBLEM, str(exc))]
    chosen = resolve_precision(device, cfg.train.precision)
    return [line(PROBLEM if chosen.overridden else OK, f"device {device}; {chosen.describe()}")]


# -- data, folds, cache, weights ----------------------------------------------------------------------------------
def _exists(path: Path, what: str, hint: str = "") -> str:
    return line(OK, f"{what}: {path}") if path.exists() else line(PROBLEM, f"{what} missing: {path}{hint}")


def data(cfg: Config) -> list[str]:
    """Each source's label csv and image folder, the folds file (and its fold count), the packed cache of each
    source (``data.cache_dir``) and the pretrained weights, found or missing."""
    sources = train_sources(cfg.data) + [test_source(cfg.data)]
    lines = []
    for source in sources:
        lines += [_exists(source.csv, f"{source.name} table"), _exists(source.images, f"{source.name} images")]
    folds_path = Path(cfg.folds.path)
    if folds_path.is_file():
        try:
            numbers = sorted(int(n) for n in read_folds_file(cfg)["fold"].dropna().unique())
            status = OK if len(numbers) == cfg.folds.n_splits else PROBLEM
            lines.append(line(status, f"folds file {folds_path}: {len(numbers)} folds (folds.n_splits="
                                      f"{cfg.folds.n_splits})"))
        except PipelineError as exc:
            lines.append(line(PROBLEM, str(exc)))
    else:
        lines.append(line(PROBLEM, f"folds file missing: {folds_path} (make it: python -m src.folds --config ...)"))
    if cfg.data.cache_dir is None:
        lines.append(line(NOT_USED, "packed cache not used (data.cache_dir is null): images are decoded each epoch"))
    else:
        for source in sources:
            cache, _ = find_cache(cfg.data, source)
            lines.append(line(OK, f"packed {source.name}: {describe(cache.manifest)}") if cache is not None else
                         line(NOT_USED, f"packed {source.name} not in {cfg.data.cache_dir} at {cfg.data.image_size}"
                                        f" px (optional: the images are decoded instead): {PACK_HINT}"))
    return lines + [weights(cfg)]


def weights(cfg: Config) -> str:
    """Where the backbone's pretrained weights come from, and whether they are on this machine."""
    pretrained, backbone = cfg.model.pretrained, cfg.model.backbone
    if pretrained is False:
        return line(NOT_USED, f"no pretrained weights: {backbone} trains from scratch (model.pretrained=false)")
    if isinstance(pretrained, str):
        return _exists(Path(pretrained), f"pretrained weights of {backbone}")
    found = cached_hub_weights(backbone)
    if found is not None:
        return line(OK, f"pretrained weights of {backbone} in the local cache: {found}")
    return line(PROBLEM, f"pretrained weights of {backbone} not in the local cache: training downloads them "
                         "(no network, as in a Kaggle notebook with internet off: point model.pretrained at a file)")


def cached_hub_weights(backbone: str) -> Path | None:
    """The file of ``backbone``'s default pretrained weights in the Hugging Face or torch hub cache, or None (also
    for a prefixed name such as ``hf-hub:...``, which timm resolves when the model is created)."""
    pretrained_cfg = None if ":" in backbone else timm.models.get_pretrained_cfg(backbone)
    if pretrained_cfg is None:
        return None
    if pretrained_cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(pretrained_cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
    if pretrained_cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(pretrained_cfg.url).name
        if path.is_file():
            return path
    return None


# -- W&B and Kaggle -----------------------------------------------------------------------------------------------
def wandb(cfg: Config) -> list[str]:
    """The W&B mode, and for ``online`` whether a key is set up (its presence only)."""
    mode = cfg.wandb.mode
    if mode != "online":
        return [line(NOT_USED if mode == "disabled" else OK, f"wandb.mode={mode}" + (
            ": runs are logged to each fold folder (upload later with `wandb sync`)" if mode == "offline" else ""))]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
    return [line(OK if has_key else PROBLEM, "wandb.mode=online; " + (
        "a key is set up (WANDB_API_KEY or ~/.netrc)" if has_key else "no key found: run `wandb login` or set "
                                                                      "WANDB_API_KEY"))]


def kaggle() -> list[str]:
    """The kaggle CLI (on PATH or beside this Python) and which kind of credentials are set up; the key itself is
    never read or printed."""
    try:
        cli = line(OK, f"kaggle CLI: {find_kaggle()}")
    except PipelineError as exc:
        cli = line(PROBLEM, str(exc))
    folder = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")
    found = [str(folder / name) for name in ("access_token", "kaggle.json") if (folder / name).is_file()]
    found += [name for name in ("KAGGLE_API_TOKEN",) if os.environ.get(name)]
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        found.append("KAGGLE_USERNAME and KAGGLE_KEY")
    credentials = (line(OK, f"Kaggle credentials: {', '.join(found)}") if found else
                   line(PROBLEM, f"no Kaggle credentials: run `kaggle auth login`, or save a token (kaggle.com > "
                                 f"Settings > API) to {folder / 'access_token'} or KAGGLE_API_TOKEN (a legacy key: "
                                 f"{folder / 'kaggle.json'} or KAGGLE_USERNAME and KAGGLE_KEY)"))
    return [cli, credentials]


# -- the estimate -------------------------------------------------------------------------------------------------
@dataclass
class Trial:
    """One batch size tried: seconds per training step and the peak memory, or out of memory."""

    batch: int
    seconds_per_step: float | None = None
    peak_bytes: int | None = None

    @property
    def fits(self) -> bool:
        return self.seconds_per_step is not None


def training_images(cfg: Config, images: int | None) -> tuple[Config, int | None]:
    """``cfg`` with the data's class count (openimages and csv take it from the labels) and the number of training
    images (``images`` when given, else counted in the label files; None when they are missing)."""
    if images is not None:
        return cfg, images
    if not all(source.csv.is_file() for source in train_sources(cfg.data)):
        return cfg, None
    cfg, table, _ = load_training_data(cfg)
    return cfg, len(table)


def stand_in_config(cfg: Config, folder: Path) -> Config:
    """``cfg`` over a stand-in label table in ``folder`` (four samples in the HPA layout, the data's class count, no
    images: the estimate's batches are synthetic), one optimizer step per batch, nothing saved, no W&B."""
    classes = cfg.data.num_classes
    if classes is None:
        raise PipelineError("doctor --estimate: data.num_classes is unknown (the label files are missing): set "
                            "data.num_classes=N")
    ids = [f"s{i}" for i in range(4)]
    get_format("hpa").write_demo_tables(folder, DemoLabels(
        train_ids=ids, train_labels=[(i % classes,) for i in range(4)], test_ids=["t0"], test_labels=[(0,)]))
    (folder / "folds.csv").write_text("Id,fold\n" + "".join(f"{i},{f}\n" for i, f in zip(ids, (1, 1, 0, 0))))
    return override(cfg, **{
        "data.format": "hpa", "data.dir": str(folder), "data.train_csv": "train.csv",
        "data.sample_submission": "sample_submission.csv", "data.extra": [], "data.cache_dir": None,
        "folds.path": str(folder / "folds.csv"), "run.dir": str(folder / "run"), "train.batch_size": 1,
        "train.global_batch": None, "train.accum_steps": 1, "train.num_workers": 0, "train.resume": False,
        "train.stop_after_steps": None, "train.checkpoint_every_steps": 0, "wandb.mode": "disabled",
        # The weights' values do not change a step's cost; fetching them could need the network.
        "model.pretrained": False,
    })


def synthetic_batch(cfg: Config, batch: int, device: torch.device, seeds: bool) -> tuple:
    """One training batch as the loader yields it: uint8 images of the configured channels and size, multi-hot
    targets (and the samples' augmentation seeds when the policy runs on the device)."""
    generator = torch.Generator().manual_seed(batch)
    size, chans = cfg.data.image_size, cfg.model.in_chans
    images = torch.randint(0, 256, (batch, chans, size, size), generator=generator, dtype=torch.uint8)
    targets = (torch.rand(batch, cfg.data.num_classes, generator=generator) < 0.1).float()
    made = (images.to(device), targets.to(device))
    return made + (torch.arange(batch),) if seeds else made


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int:
    """Peak memory in bytes: CUDA's max allocated since the last reset, or on a CPU the process's peak resident
    size so far (``ru_maxrss``, which only grows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory (CUDA's error, or a CPU allocation that failed)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def try_batch(trainer: Trainer, batch: int, steps: int) -> Trial:
    """Train one warm-up step (cuDNN autotuning, allocator, compilation) and ``steps`` timed steps at ``batch``."""
    parts = trainer.parts
    device = parts.device
    trial = Trial(batch)
    batches = None
    try:
        batches = [synthetic_batch(parts.cfg, batch, device, parts.batch_augment is not None)] * (steps + 1)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train_epoch(batches[:1])
        _synchronize(device)
        start = time.perf_counter()
        trainer.train_epoch(batches[1:])
        _synchronize(device)
        trial.seconds_per_step = (time.perf_counter() - start) / steps
        trial.peak_bytes = peak_memory(device)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
    if not trial.fits:  # freed outside the except block, whose traceback holds the activations
        batches = None
        parts.optimizer.zero_grad(set_to_none=True)
        # A step cut between unscale_ and update leaves the scaler mid-step: the next batch size gets a fresh one.
        parts.scaler = torch.amp.GradScaler(device.type, enabled=parts.scaler.is_enabled())
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return trial


def search_batches(trainer: Trainer, start: int, max_batch: int, steps: int, say=print) -> list[Trial]:
    """Try ``start`` (capped at ``max_batch``), then double while it fits and stays within ``max_batch``; when
    ``start`` does not fit, halve until one does. Returns the trials in the order they ran."""
    batch = min(start, max_batch)
    trials = [try_batch(trainer, batch, steps)]
    say(_trial_row(trials[-1], trainer.parts.device))
    step = 2 if trials[-1].fits else 0.5
    while True:
        batch = int(batch * step)
        if batch < 1 or batch > max_batch:
            return trials
        trials.append(try_batch(trainer, batch, steps))
        say(_trial_row(trials[-1], trainer.parts.device))
        if trials[-1].fits != (step == 2):  # doubling hit the memory limit, or halving found a batch that fits
            return trials


def _trial_row(trial: Trial, device: torch.device) -> str:
    if not trial.fits:
        return f"  {trial.batch:>6}  out of memory"
    where = "CUDA max allocated" if device.type == "cuda" else "process peak RSS"
    return (f"  {trial.batch:>6}  {trial.seconds_per_step:8.3f}  {trial.batch / trial.seconds_per_step:9.1f}  "
            f"{trial.peak_bytes / GIB:7.2f} GiB ({where})")


def duration(seconds: float) -> str:
    """``3 h 25 min``, ``12 min 5 s``, ``41.2 s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{seconds:.1f} s"


def predictions(cfg: Config, best: Trial, images: int | None) -> list[str]:
    """Epoch, fold and all-folds times at ``best``'s batch, and the accumulation that keeps ``train.global_batch``."""
    tc, k = cfg.train, cfg.folds.n_splits
    lines = []
    if images is None:
        lines.append(line(PROBLEM, "the training label files are missing: pass --images N (training images) for "
                                   "epoch and fold times"))
    else:
        fold_images = images * (k - 1) // k  # the other folds train
        steps = fold_images // best.batch  # full batches only, as training drops the last partial one
        epoch = steps * best.seconds_per_step
        lines.append(line(OK, f"at batch {best.batch}: {fold_images} training images per fold ({images} x {k - 1}/{k})"
                              f" = {steps} steps per epoch: epoch {duration(epoch)}, fold ({tc.epochs} epochs) "
                              f"{duration(epoch * tc.epochs)}, all {k} folds {duration(epoch * tc.epochs * k)}"))
    if tc.global_batch is None:
        lines.append(line(OK, f"train.global_batch is null: train.batch_size={best.batch} with train.accum_steps="
                              f"{tc.accum_steps} makes {best.batch * tc.accum_steps} images per optimizer step"))
    else:
        accum = max(1, round(tc.global_batch / best.batch))
        exact = "" if accum * best.batch == tc.global_batch else f" ({accum * best.batch} images per step, not exact)"
        lines.append(line(OK, f"train.batch_size={best.batch} keeps train.global_batch={tc.global_batch} with "
                              f"accumulation {accum}{exact} (derived by training)"))
    return lines


def estimate(cfg: Config, max_batch: int | None = None, steps: int = 3, images: int | None = None,
             say=print) -> list[Trial]:
    """Measure training steps of ``cfg`` on its device at growing batch sizes and print what they predict (see the
    module docstring); returns the trials."""
    if steps < 1:
        raise PipelineError(f"doctor --estimate: --steps must be at least 1, got {steps}")
    cfg, images = training_images(cfg, images)
    device = resolve_device(cfg.train.device)
    start = cfg.train.batch_size
    if max_batch is None:  # a CPU has no memory error to stop at, only swapping
        max_batch = start * (4 if device.type == "cpu" else 16)
    if max_batch < 1:
        raise PipelineError(f"doctor --estimate: --max-batch must be at least 1, got {max_batch}")
    size, chans = cfg.data.image_size, cfg.model.in_chans
    say("estimate")
    say(f"  {cfg.model.backbone}, synthetic uint8 batches of {chans} x {size} x {size} on {device}, "
        f"{resolve_precision(device, cfg.train.precision).name}, {steps} timed step(s) after one warm-up, one "
        "optimizer step per batch (data loading, CPU augmentation and validation not included)")
    with tempfile.TemporaryDirectory(prefix="doctor-") as folder:
        parts = build_parts(stand_in_config(cfg, Path(folder)), 0, progress=False)
        trainer = Trainer(parts, progress=False)
        say("   batch    s/step   images/s  peak memory")  # the rows of _trial_row
        trials = search_batches(trainer, start, max_batch, steps, say)
    fitting = [trial for trial in trials if trial.fits]
    if not fitting:
        say(line(PROBLEM, "no batch fits, down to 1: lower data.image_size, or set model.grad_checkpointing=true"))
        return trials
    best = max(fitting, key=lambda trial: trial.batch)
    limit = "out of memory above it" if any(not t.fits for t in trials) else f"--max-batch {max_batch} reached"
    say(line(OK, f"largest batch that fits: {best.batch} ({limit})"))
    for text in predictions(cfg, best, images):
        say(text)
    return trials


# -- the report ---------------------------------------------------------------------------------------------------
def report(cfg: Config) -> list[str]:
    """Every part of the check, each under its heading."""
    parts = {"versions": versions(), "GPUs": gpus(), "precision": precision(cfg), "data": data(cfg),
             "W&B": wandb(cfg), "Kaggle": kaggle()}
    lines = []
    for heading, part in parts.items():
        lines += [heading, *part]
    problems = sum(text.startswith(f"  {PROBLEM}") for text in lines)
    return lines + [f"{problems} problem(s) found" if problems else "no problems found"]


def main(argv: list[str] | None = None) -> None:
    parser = cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--estimate", action="store_true",
                        help="run real training steps on the device: the largest batch that fits, its speed and "
                             "memory, and the time of an epoch, a fold and all folds")
    parser.add_argument("--max-batch", type=int, help="the largest batch --estimate tries (default: 16x "
                                                      "train.batch_size on a GPU, 4x on a CPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per batch size (default 3)")
    parser.add_argument("--images", type=int, help="training images, for the epoch time (default: counted in the "
                                                   "label files)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    print("\n".join(report(cfg)), flush=True)
    if args.estimate:
        estimate(cfg, args.max_batch, args.steps, args.images)


if __name__ == "__main__":
    run_cli(main)
