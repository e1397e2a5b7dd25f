"""Rare-class sampling (train.sampler=rare): the weights, the frequencies they give, and the exactness the uniform
sampler has (epoch length, mid-epoch resume, DDP shards of one drawn sequence); power 0 is the uniform sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.dataset import EpochSampler, rarity_weights

# counts: class 0 on 3 rows, class 1 on 2, class 2 on 2, no label on 1 row
LABELS = [(0,), (0, 1), (1,), (), (2,), (0, 2)]
RAREST = np.array([3, 2, 2, 1, 2, 2], dtype=float)


def pairs_of(sampler: EpochSampler, state: torch.Tensor | None = None, skip: int = 0) -> list[tuple[int, int]]:
    sampler.start_epoch(state, skip)
    return list(sampler)


@pytest.mark.parametrize("power", [1.0, 0.5, 2.0])
def test_a_samples_weight_is_the_inverse_frequency_of_its_rarest_label_to_the_power(power):
    assert np.allclose(rarity_weights(LABELS, 3, power), RAREST ** -power)


def test_power_zero_is_the_uniform_sampler_in_its_exact_order():
    assert rarity_weights(LABELS, 3, 0.0) is None
    uniform = EpochSampler(len(LABELS), seed=4, weights=rarity_weights(LABELS, 3, 0.0))
    # The uniform sampler as it always drew: a permutation, then a seed per sample index.
    generator = torch.Generator().manual_seed(4)
    for _ in range(3):
        order = torch.randperm(len(LABELS), generator=generator)
        seeds = torch.randint(0, 2**31 - 1, (len(LABELS),), generator=generator)
        assert pairs_of(uniform) == [(int(i), int(seeds[i])) for i in order]
        uniform.epoch_state = uniform.generator.get_state()  # as the trainer does at an epoch's end


def test_draw_frequencies_over_many_epochs_follow_the_weights():
    weights = rarity_weights(LABELS, 3, 1.0)
    sampler = EpochSampler(len(LABELS), seed=0, weights=weights)
    counts = np.zeros(len(LABELS))
    for _ in range(2000):
        epoch = pairs_of(sampler)
        assert len(epoch) == len(sampler) == len(LABELS)  # an epoch keeps its length
        np.add.at(counts, [index for index, _ in epoch], 1)
        sampler.epoch_state = sampler.generator.get_state()
    expected = weights / weights.sum() * counts.sum()
    chi_square = ((counts - expected) ** 2 / expected).sum()
    assert chi_square < 20.5  # 5 degrees of freedom: p = 0.001
    uniform = np.full(len(LABELS), counts.sum() / len(LABELS))
    assert ((counts - uniform) ** 2 / uniform).sum() > 200  # and far from uniform: the row without labels x2


@pytest.mark.parametrize("skip", [0, 3, 6])
def test_a_weighted_epoch_resumes_mid_epoch_exactly(skip):
    weights = rarity_weights(LABELS, 3, 1.0)
    sampler = EpochSampler(len(LABELS), seed=11, weights=weights)
    for epoch in range(2):
        full = pairs_of(sampler)
        saved_state = sampler.epoch_state.clone()  # what a checkpoint stores
        resumed = EpochSampler(len(LABELS), seed=999, weights=weights)  # a fresh one, as after a restart
        assert pairs_of(resumed, saved_state, skip) == full[skip:], f"epoch {epoch}"
        assert len(resumed) == len(LABELS) - skip
        sampler.epoch_state = sampler.generator.get_state()


def test_ddp_ranks_take_disjoint_slices_of_one_drawn_sequence():
    labels = LABELS + [(1,)]  # 7 samples on 2 ranks: one draw is repeated to pad
    weights = rarity_weights(labels, 3, 1.0)
    whole = pairs_of(EpochSampler(len(labels), seed=5, weights=weights))
    padded = whole + whole[:1]
    ranks = [pairs_of(EpochSampler(len(labels), seed=5, rank=rank, world_size=2, weights=weights)) for rank in (0, 1)]
    assert ranks == [padded[0::2], padded[1::2]]
    # each draw its own augmentation seed, so a sample drawn twice is augmented twice differently
    assert len({seed for _, seed in whole}) == len(whole)


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="6 positive weights"):
        EpochSampler(6, seed=0, weights=np.array([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]))
