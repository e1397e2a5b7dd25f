"""Gradient accumulation through the real loop: K micro-batches of B update like one batch of K*B.

Two Trainers are made comparable: fp32, plain SGD (lr 1, no momentum or decay) at a constant rate, no
augmentation, no dropout, BatchNorm in eval mode (batch statistics of a micro-batch are not those of
the union), and a per-sample loss (BCE/focal; soft macro-F1 is a batch statistic and does not
decompose over micro-batches). Everything else is Trainer.train_epoch as it runs in training.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from src.train import Trainer, window_sizes
from tests.conftest import tiny_config
from tests.helpers import one_torch_thread, write_folds

COMPARABLE = (
    "train.precision=fp32", "train.clip_grad=null", "train.weight_decay=0",
    "train.augment.d4=0", "train.augment.shift_scale_rotate=0", "train.augment.brightness_contrast=0",
    "train.augment.gamma=0", "model.modifier.feature_dropout=0", "model.drop_rate=0",
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with one_torch_thread():
        yield


# -- window_sizes ---------------------------------------------------------------------------------
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
    """Plain SGD that keeps a copy of the gradients it steps with (one entry per optimizer step)."""

    def __init__(self, params, lr: float):
        super().__init__(params, lr=lr, momentum=0.0, weight_decay=0.0)
        self.step_grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.step_grads.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                                for group in self.param_groups for p in group["params"]])
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
    trainer = Trainer(cfg, fold=0, progress=False)
    trainer.optimizer = RecordingSGD(trainer.model.parameters(), lr=1.0)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    keep_batchnorm_in_eval(trainer.model)
    return trainer


def train_pair(tiny_data, tmp_path, n_train, batch_size, accum_steps, loss="bce"):
    accumulated = comparable_trainer(tiny_data, tmp_path / "accumulated", n_train, batch_size, accum_steps, loss)
    one_batch = comparable_trainer(tiny_data, tmp_path / "one_batch", n_train, batch_size * accum_steps, 1, loss)
    # Same seed: same initial weights and the same sample order (EpochSampler draws from the seed).
    for p, q in zip(accumulated.model.parameters(), one_batch.model.parameters()):
        assert torch.equal(p, q)
    accumulated.sampler.start_epoch(accumulated.sampler.epoch_state)
    one_batch.sampler.start_epoch(one_batch.sampler.epoch_state)
    assert list(accumulated.sampler) == list(one_batch.sampler)
    assert accumulated.train_epoch() and one_batch.train_epoch()
    return accumulated, one_batch


@pytest.mark.slow
@pytest.mark.parametrize("n_train, batch_size, accum_steps", [
    (24, 4, 3),  # exact: 2 windows of 3 x 4
    (22, 4, 3),  # micro-batches 4,4,4 | 4,4,2: short last batch in a short last window
    (22, 5, 2),  # 5,5 | 5,5 | 2: the last window is one short batch
    (23, 4, 4),  # 4,4,4,4 | 4,3
])
def test_accumulated_micro_batches_update_like_one_big_batch(tiny_data, tmp_path, n_train, batch_size,
                                                             accum_steps):
    accumulated, one_batch = train_pair(tiny_data, tmp_path, n_train, batch_size, accum_steps)

    n_windows = math.ceil(math.ceil(n_train / batch_size) / accum_steps)
    assert accumulated.state.step == one_batch.state.step == n_windows == accumulated.steps_per_epoch
    assert len(accumulated.optimizer.step_grads) == n_windows
    for step, (grads, reference) in enumerate(zip(accumulated.optimizer.step_grads, one_batch.optimizer.step_grads)):
        assert any(g.abs().sum() > 0 for g in reference)
        for g, r in zip(grads, reference):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: {m}")
    for (name, p), q in zip(accumulated.model.named_parameters(), one_batch.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_accumulation_with_focal_loss(tiny_data, tmp_path):
    accumulated, one_batch = train_pair(tiny_data, tmp_path, 22, 4, 3, loss="focal")
    for p, q in zip(accumulated.model.parameters(), one_batch.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_comparison_detects_an_undivided_loss(tiny_data, tmp_path):
    # Control: scale each micro-batch as if it were a whole window (the classic bug: K x the gradient,
    # and a short last window over-weighted). The same comparison must then fail.
    accumulated = comparable_trainer(tiny_data, tmp_path / "accumulated", 22, 4, 3)
    one_batch = comparable_trainer(tiny_data, tmp_path / "one_batch", 22, 12, 1)
    accumulated.window_sizes = [4] * len(accumulated.window_sizes)
    accumulated.train_epoch()
    one_batch.train_epoch()
    first_step = zip(accumulated.optimizer.step_grads[0], one_batch.optimizer.step_grads[0])
    assert any(not torch.allclose(g, r, rtol=1e-5, atol=1e-6) for g, r in first_step)
