"""Gradient accumulation through the real loop: K micro-batches of B update like one batch of K*B.

Trainers are made comparable: fp32, plain SGD (lr 1, no momentum or decay) at a constant rate, no
augmentation, no dropout, BatchNorm in eval mode (batch statistics of a micro-batch are not those of
the union), and a per-sample loss (BCE/focal; soft macro-F1 is a batch statistic and does not
decompose over micro-batches). Everything else is Trainer.train_epoch as it runs in training.

Two references: a second Trainer with batch K*B and no accumulation (where both see the same windows),
and, for every optimizer step including a short last window, the gradient of one forward/backward
over all the samples of that window at the parameters the step started from.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from src.model import build_model
from src.train import Trainer, accumulation_windows, build_parts
from tests.conftest import tiny_config
from tests.helpers import write_folds

COMPARABLE = (
    "train.precision=fp32", "train.clip_grad=null", "train.weight_decay=0",
    "train.augment.d4=0", "train.augment.shift_scale_rotate=0", "train.augment.brightness_contrast=0",
    "train.augment.gamma=0", "model.modifier.feature_dropout=0", "model.drop_rate=0",
)


# -- accumulation windows -------------------------------------------------------------------------
def window_sizes(num_samples: int, batch_size: int, accum_steps: int) -> list[int]:
    """For each micro-batch of an epoch of ``num_samples``, the samples in its accumulation window, as
    the loop groups them (:func:`accumulation_windows`)."""
    batches = [min(batch_size, num_samples - start) for start in range(0, num_samples, batch_size)]
    return [sum(window) for window in accumulation_windows(batches, accum_steps) for _ in window]


@pytest.mark.parametrize("num_samples, batch_size, accum_steps, expected", [
    (24, 4, 3, [12] * 6),  # exact division
    (22, 4, 3, [12, 12, 12, 10, 10, 10]),  # short last batch (2) inside a short last window
    (22, 5, 2, [10, 10, 10, 10, 2]),  # the short last window is the short last batch alone
    (23, 4, 4, [16, 16, 16, 16, 7, 7]),  # short last window of two micro-batches
    (10, 4, 1, [4, 4, 2]),  # no accumulation: each batch is its own window
    (3, 8, 4, [3]),  # fewer samples than one batch
])
def test_window_sizes(num_samples, batch_size, accum_steps, expected):
    assert window_sizes(num_samples, batch_size, accum_steps) == expected


def test_window_shares_sum_to_one_per_window():
    # The loop scales each micro-batch's mean loss by len(batch) / window; over a window the shares must
    # add up to exactly 1, or the step is too big/small (an undivided loss, a dropped short window).
    for num_samples, batch_size, accum_steps in itertools.product([1, 7, 16, 22, 23, 24, 25], [1, 3, 4, 8],
                                                                  [1, 2, 3, 5]):
        check_window_shares(num_samples, batch_size, accum_steps)


def check_window_shares(num_samples: int, batch_size: int, accum_steps: int) -> None:
    sizes = window_sizes(num_samples, batch_size, accum_steps)
    batches = [min(batch_size, num_samples - start) for start in range(0, num_samples, batch_size)]
    case = f"window_sizes({num_samples}, {batch_size}, {accum_steps}) = {sizes}"
    assert len(sizes) == len(batches), case
    n_windows = math.ceil(len(batches) / accum_steps)
    for w in range(n_windows):
        members = range(w * accum_steps, min((w + 1) * accum_steps, len(batches)))
        assert sum(batches[i] / sizes[i] for i in members) == pytest.approx(1.0), case
        assert all(sizes[i] == sum(batches[j] for j in members) for i in members), case


# -- through Trainer.train_epoch ------------------------------------------------------------------
class RecordingSGD(torch.optim.SGD):
    """Plain SGD that keeps, for every step, the parameters it started from and the gradients it used."""

    def __init__(self, params, lr: float):
        super().__init__(params, lr=lr, momentum=0.0, weight_decay=0.0)
        self.step_params: list[list[torch.Tensor]] = []
        self.step_grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        self.step_params.append([p.detach().clone() for p in params])
        self.step_grads.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params])
        return super().step(closure)


def keep_batchnorm_in_eval(model: nn.Module) -> None:
    """Make ``model.train()`` leave BatchNorm layers in eval mode (running statistics)."""
    module_train = model.train

    def train(mode: bool = True):
        module_train(mode)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return model

    model.train = train


def comparable_trainer(tiny_data, work_dir, n_train: int, batch_size: int, accum_steps: int,
                       loss: str = "bce") -> Trainer:
    cfg = tiny_config(tiny_data, work_dir, *COMPARABLE, f"train.batch_size={batch_size}",
                      f"train.accum_steps={accum_steps}", f"loss.name={loss}")
    write_folds(cfg, n_train)
    parts = build_parts(cfg, fold=0, progress=False)
    parts.optimizer = RecordingSGD(parts.model.parameters(), lr=1.0)
    parts.scheduler = torch.optim.lr_scheduler.LambdaLR(parts.optimizer, lambda step: 1.0)
    keep_batchnorm_in_eval(parts.model)
    return Trainer(parts, progress=False)


def epoch_order(trainer: Trainer) -> list[tuple[int, int]]:
    """The (index, seed) pairs the coming epoch will train on, in order."""
    sampler = trainer.parts.sampler
    sampler.start_epoch(sampler.epoch_state)  # epoch_batches restarts from this same state
    return list(sampler)


def step_windows(trainer: Trainer) -> list[int]:
    """Samples per optimizer step of one epoch: full batches (the loader drops a partial last one) grouped
    by accum_steps."""
    tc = trainer.cfg.train
    usable = len(trainer.parts.train_set) // tc.batch_size * tc.batch_size
    return window_sizes(usable, tc.batch_size, tc.accum_steps)[::tc.accum_steps]


def union_batch_gradients(trainer: Trainer, order: list[tuple[int, int]]) -> list[list[torch.Tensor]]:
    """For each step the trainer took: the gradient of one batch made of all the samples of its window,
    at the parameters that step started from."""
    reference = build_model(trainer.cfg)
    reference.load_state_dict(trainer.parts.model.state_dict())  # BN running statistics (unchanged in eval)
    reference.eval()  # BatchNorm on running statistics, as in the trainer; dropout is 0 anyway
    gradients, first = [], 0
    for params, size in zip(trainer.parts.optimizer.step_params, step_windows(trainer)):
        with torch.no_grad():
            for p, value in zip(reference.parameters(), params):
                p.copy_(value)
        images, targets = default_collate([trainer.parts.train_set[pair] for pair in order[first : first + size]])
        reference.zero_grad(set_to_none=True)
        trainer.parts.loss_fn(reference(images).float(), targets).backward()
        gradients.append([p.grad.clone() for p in reference.parameters()])
        first += size
    return gradients


def assert_close_gradients(actual: list[list[torch.Tensor]], expected: list[list[torch.Tensor]]) -> None:
    assert len(actual) == len(expected)
    for step, (grads, reference) in enumerate(zip(actual, expected)):
        assert any(r.abs().sum() > 0 for r in reference), f"step {step}: zero gradient, nothing tested"
        for g, r in zip(grads, reference):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("n_train, batch_size, accum_steps, loss", [
    (24, 4, 3, "bce"),  # windows of exactly 3 x 4
    (20, 4, 2, "bce"),  # 5 micro-batches: the last window holds one of them
    (22, 4, 3, "bce"),  # a short last window (and a partial batch of 2 the loader may drop)
    (23, 4, 4, "bce"),
    (22, 5, 3, "focal"),
])
def test_each_step_uses_the_gradient_of_one_batch_of_its_window(tiny_data, tmp_path, n_train, batch_size,
                                                               accum_steps, loss):
    trainer = comparable_trainer(tiny_data, tmp_path, n_train, batch_size, accum_steps, loss)
    order = epoch_order(trainer)
    assert trainer.train_epoch(trainer.epoch_batches())

    windows = step_windows(trainer)
    assert windows[0] == batch_size * accum_steps
    step_grads = trainer.parts.optimizer.step_grads
    assert trainer.state.step == len(windows) == trainer.parts.steps_per_epoch == len(step_grads)
    if n_train % (batch_size * accum_steps):
        assert windows[-1] < batch_size * accum_steps  # the case really has a short last window
    assert_close_gradients(step_grads, union_batch_gradients(trainer, order))


@pytest.mark.slow
@pytest.mark.parametrize("batch_size, accum_steps", [(4, 3), (3, 4), (2, 6)])
def test_accumulated_run_ends_where_the_big_batch_run_ends(tiny_data, tmp_path, batch_size, accum_steps):
    n_train = 24  # both runs see the same two windows of 12
    accumulated = comparable_trainer(tiny_data, tmp_path / "accumulated", n_train, batch_size, accum_steps)
    one_batch = comparable_trainer(tiny_data, tmp_path / "one_batch", n_train, batch_size * accum_steps, 1)
    # Same seed: same initial weights and the same sample order.
    for p, q in zip(accumulated.parts.model.parameters(), one_batch.parts.model.parameters()):
        assert torch.equal(p, q)
    assert epoch_order(accumulated) == epoch_order(one_batch)
    assert accumulated.train_epoch(accumulated.epoch_batches()) and one_batch.train_epoch(one_batch.epoch_batches())

    assert accumulated.state.step == one_batch.state.step == 2
    assert_close_gradients(accumulated.parts.optimizer.step_grads, one_batch.parts.optimizer.step_grads)
    for (name, p), q in zip(accumulated.parts.model.named_parameters(), one_batch.parts.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_the_comparison_detects_an_undivided_loss(tiny_data, tmp_path):
    # Control: each micro-batch's loss not divided by its share of the window (the classic bug: K x the
    # gradient, as if each micro-batch were a whole window). The same comparison must then fail.
    trainer = comparable_trainer(tiny_data, tmp_path, 22, 4, 3)
    order = epoch_order(trainer)
    divided_loss = trainer.parts.loss_fn
    trainer.parts.loss_fn = lambda outputs, targets: divided_loss(outputs, targets) * 3  # undoes the 1/3 share
    trainer.train_epoch(trainer.epoch_batches())
    trainer.parts.loss_fn = divided_loss
    with pytest.raises(AssertionError):
        assert_close_gradients(trainer.parts.optimizer.step_grads, union_batch_gradients(trainer, order))
