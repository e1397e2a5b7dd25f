"""Label embedding: PMI against a naive reference, SVD structure, decoding, the cosine loss, save/load."""

from __future__ import annotations

import math
from itertools import combinations_with_replacement

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse
from threadpoolctl import threadpool_limits

from src.config import PipelineError
from src.data import DataError, label_matrix
from src.label_embedding import (
    CosineProximityLoss,
    LabelEmbedding,
    decode,
    decode_top_k,
    embed,
    empty_labels,
    label_matrix_sparse,
    pmi_matrix,
    targets,
    top_k,
    truncated_svd,
)
from src.report import plot_label_map, plot_similarity_heatmap


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    # As for torch (conftest): tiny matrices, and BLAS threads that spin-wait on a shared box are slower.
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def random_labels(seed: int, n: int = 150, m: int = 9, absent: int | None = None) -> list[tuple[int, ...]]:
    """Label sets with empty rows, repeats, a skewed frequency and optionally one label never used."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, m + 1)
    if absent is not None:
        weights[absent] = 0
    weights /= weights.sum()
    return [tuple(int(c) for c in rng.choice(m, size=rng.integers(0, 5), p=weights)) for _ in range(n)]


def grouped_labels(seed: int, groups: list[range], n: int = 600, keep: float = 0.6) -> list[tuple[int, ...]]:
    """Each sample: one group, then each of its labels with probability ``keep`` (at least one)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        members = np.array(groups[rng.integers(len(groups))])
        chosen = members[rng.random(len(members)) < keep]
        rows.append(tuple(int(c) for c in (chosen if len(chosen) else members[:1])))
    return rows


def naive_pmi(labels, m: int, positive: bool, smoothing: float) -> np.ndarray:
    """Straight from the definition, with Python loops over samples and pairs."""
    n = len(labels)
    sets = [set(row) for row in labels]
    count = np.zeros((m, m))
    for i, j in combinations_with_replacement(range(m), 2):
        count[i, j] = count[j, i] = sum(1 for s in sets if i in s and j in s)
    pmi = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            if count[i, j] > 0:
                value = math.log(n * count[i, j] / ((count[i, i] + smoothing) * (count[j, j] + smoothing)))
                pmi[i, j] = max(value, 0.0) if positive else value
    return pmi


def cosine_matrix(E: np.ndarray) -> np.ndarray:
    unit = E / np.linalg.norm(E, axis=1, keepdims=True)
    return unit @ unit.T


# -- label matrix and PMI ------------------------------------------------------------------------------
def test_label_matrix_sparse_matches_the_dense_data_layer():
    labels = random_labels(0, absent=4) + [(), (3, 3, 3)]
    expected = label_matrix(labels, 9)
    for column in (labels, pd.Series(labels)):
        M = label_matrix_sparse(column, 9)
        assert M.shape == (len(labels), 9) and M.has_canonical_format
        np.testing.assert_array_equal(M.toarray(), expected)
        assert set(np.unique(M.data)) == {1}


def test_label_matrix_sparse_names_the_bad_row():
    with pytest.raises(DataError, match=r"labels of row 2: \(1, 9\) has a class outside 0\.\.8"):
        label_matrix_sparse([(0,), (), (1, 9)], 9)


@pytest.mark.parametrize("positive,smoothing", [(True, 0.0), (False, 0.0), (True, 2.5), (False, 2.5)])
@pytest.mark.parametrize("seed", range(3))
def test_pmi_matches_the_naive_reference(seed, positive, smoothing):
    labels = random_labels(seed, absent=seed + 2)
    pmi = pmi_matrix(label_matrix_sparse(labels, 9), positive=positive, smoothing=smoothing)
    reference = naive_pmi(labels, 9, positive, smoothing)
    assert sparse.issparse(pmi) and pmi.dtype == np.float32
    np.testing.assert_allclose(pmi.toarray(), reference, rtol=1e-5, atol=1e-6)
    # Only the pairs with a non-zero PMI are stored: never-co-occurring (and, for PPMI, negative) ones are not.
    stored = np.zeros((9, 9), bool)
    stored[pmi.nonzero()] = True
    np.testing.assert_array_equal(stored, reference != 0)
    assert np.diff(pmi.indptr)[seed + 2] == 0 and pmi.getcol(seed + 2).nnz == 0  # the absent label
    if positive:
        assert (pmi.data > 0).all()
    else:
        assert (pmi.data < 0).any()  # the random data has pairs rarer than chance


def test_smoothing_lowers_rare_labels_more():
    labels = random_labels(1)
    M = label_matrix_sparse(labels, 9)
    raw, smoothed = pmi_matrix(M, False).toarray(), pmi_matrix(M, False, smoothing=3.0).toarray()
    support = np.asarray(M.sum(axis=0)).ravel()
    drop = np.diag(raw - smoothed)  # = 2 log(1 + s / C_ii)
    np.testing.assert_allclose(drop, 2 * np.log1p(3.0 / support), rtol=1e-5)
    assert drop[np.argmin(support)] > drop[np.argmax(support)]


# -- embedding -----------------------------------------------------------------------------------------
GROUPS = [range(0, 5), range(5, 11)]


def test_labels_of_a_group_are_closer_than_labels_across_groups():
    labels = grouped_labels(0, GROUPS)
    E = embed(pmi_matrix(label_matrix_sparse(labels, 11)), dim=4, seed=0)
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1.0, rtol=1e-5)
    similarity = cosine_matrix(E)
    same = np.equal.outer(np.arange(11) < 5, np.arange(11) < 5)
    off_diagonal = ~np.eye(11, dtype=bool)
    assert similarity[same & off_diagonal].min() > similarity[~same].max() + 0.3


def test_full_rank_embedding_reconstructs_a_positive_semidefinite_ppmi():
    labels = grouped_labels(1, GROUPS)
    pmi = pmi_matrix(label_matrix_sparse(labels, 11)).toarray()
    assert np.linalg.eigvalsh(pmi).min() > 0  # the self-information diagonal dominates here
    raw = embed(sparse.csr_matrix(pmi), dim=11, normalize=False)
    np.testing.assert_allclose(raw @ raw.T, pmi, atol=1e-4)


def test_rank_two_ppmi_is_reconstructed_with_dim_two():
    # Every sample holds a whole group: PPMI is two constant blocks, log(n / group count), rank 2.
    rows = [tuple(GROUPS[i % 2]) for i in range(7)] + [tuple(GROUPS[0])]
    pmi = pmi_matrix(label_matrix_sparse(rows, 11))
    raw = embed(pmi, dim=2, normalize=False)
    np.testing.assert_allclose(raw @ raw.T, pmi.toarray(), atol=1e-5)
    np.testing.assert_allclose(pmi[0, 0], math.log(8 / 5), rtol=1e-6)


def test_negative_eigen_directions_approximate_the_matrix_absolute_value():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((8, 3)))
    eigenvalues = np.array([3.0, -2.0, 1.0])
    matrix = (basis * eigenvalues) @ basis.T
    U, S, signs = truncated_svd(sparse.csr_matrix(matrix), 3)
    np.testing.assert_allclose(S, [3.0, 2.0, 1.0], rtol=1e-5)
    np.testing.assert_array_equal(signs, [1, -1, 1])
    raw = embed(sparse.csr_matrix(matrix), 3, normalize=False)
    np.testing.assert_allclose(raw @ raw.T, (basis * np.abs(eigenvalues)) @ basis.T, atol=1e-5)
    assert not np.allclose(raw @ raw.T, matrix, atol=0.1)


def test_randomized_svd_agrees_with_the_exact_one():
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.standard_normal((300, 6)))
    matrix = (basis * [10.0, 8.0, -7.0, 6.0, 5.0, 4.0]) @ basis.T + 1e-3 * rng.standard_normal((300, 300))
    matrix = sparse.csr_matrix((matrix + matrix.T) / 2)
    exact = embed(matrix, 6, method="exact", normalize=False)
    randomized = embed(matrix, 6, method="randomized", seed=3, normalize=False)
    np.testing.assert_allclose(randomized @ randomized.T, exact @ exact.T, atol=1e-3)


def test_unseen_labels_get_zero_rows_and_are_reported(capsys):
    labels = grouped_labels(2, GROUPS)
    fitted = LabelEmbedding.fit(labels, 13, dim=4)
    np.testing.assert_array_equal(fitted.empty_labels, [11, 12])
    assert not fitted.embedding[11:].any() and fitted.support[11:].sum() == 0
    assert "2 of 13 labels" in capsys.readouterr().err
    np.testing.assert_array_equal(empty_labels(fitted.embedding), [11, 12])


def test_dim_out_of_range_is_an_error():
    pmi = pmi_matrix(label_matrix_sparse(grouped_labels(0, GROUPS), 11))
    with pytest.raises(ValueError, match=r"dim must be in 1\.\.11"):
        embed(pmi, 12)


# -- decoding --------------------------------------------------------------------------------------------
def test_decoding_a_target_returns_exactly_its_labels_on_well_separated_data():
    groups = [range(0, 3), range(3, 7), range(7, 12)]
    rng = np.random.default_rng(0)
    labels = [tuple(groups[g]) for g in rng.integers(0, 3, size=90)]
    fitted = LabelEmbedding.fit(labels, 14, dim=3, verbose=False)
    scores = fitted.decode(fitted.targets(labels))
    assert scores.shape == (90, 14) and scores.min() >= 0 and scores.max() <= 1
    for row, sample in zip(scores, labels):
        assert set(np.argsort(-row, kind="stable")[: len(sample)]) == set(sample)
    assert (scores[:, 12:] == 0).all()  # never seen, never predicted


def test_decoding_targets_recovers_nearly_all_labels_of_random_subsets_of_groups():
    # Each sample holds a random half of one group: its target must point at those labels, not merely at
    # the group (a group-level embedding, e.g. dim = number of groups, gets about 70% here).
    groups = [range(0, 6), range(6, 14), range(14, 20), range(20, 30)]
    labels = grouped_labels(3, groups, n=800, keep=0.5)
    fitted = LabelEmbedding.fit(labels, 30, dim=30, verbose=False)
    best, _ = top_k(fitted.decode(fitted.targets(labels)), 7)
    hits = sum(len(set(sample) & set(best_row[: len(set(sample))])) for sample, best_row in zip(labels, best))
    assert hits / sum(len(set(sample)) for sample in labels) > 0.97


def test_decode_is_scaled_cosine_and_chunking_changes_nothing():
    rng = np.random.default_rng(0)
    E = rng.standard_normal((20, 5)).astype(np.float32)
    E[7] = 0
    outputs = rng.standard_normal((50, 5)).astype(np.float32)
    outputs[3] = 0
    unit_E = E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-30)
    unit_out = outputs / np.maximum(np.linalg.norm(outputs, axis=1, keepdims=True), 1e-30)
    expected = (unit_out @ unit_E.T + 1) / 2
    expected[:, 7] = 0
    full = decode(outputs, E)
    np.testing.assert_allclose(full, expected, atol=1e-6)
    np.testing.assert_allclose(full[3, np.arange(20) != 7], 0.5)
    np.testing.assert_allclose(decode(outputs, E, chunk_rows=7), full, atol=1e-6)  # BLAS blocks differ by 1 ulp
    indices, values = decode_top_k(outputs, E, 4, chunk_rows=9)
    expected_indices, expected_values = top_k(np.vstack([decode(outputs[i:i + 9], E) for i in range(0, 50, 9)]), 4)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(values, expected_values)


def test_top_k_orders_best_first_and_breaks_ties_by_index():
    scores = np.array([[0.1, 0.9, 0.5, 0.9, 0.2], [0.3, 0.3, 0.3, 0.3, 0.3]], dtype=np.float32)
    indices, values = top_k(scores, 3)
    np.testing.assert_array_equal(indices, [[1, 3, 2], [0, 1, 2]])
    np.testing.assert_allclose(values, [[0.9, 0.9, 0.5], [0.3, 0.3, 0.3]])
    np.testing.assert_array_equal(top_k(scores, 9)[0][0], [1, 3, 2, 4, 0])
    many = np.random.default_rng(0).random((23, 40)).astype(np.float32)
    for got, expected in zip(top_k(many, 5, chunk_rows=4), top_k(many, 5)):
        np.testing.assert_array_equal(got, expected)


# -- loss ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted() -> LabelEmbedding:
    return LabelEmbedding.fit(grouped_labels(4, GROUPS), 11, dim=6, verbose=False)


def multi_hot(labels, m: int) -> torch.Tensor:
    return torch.from_numpy(label_matrix(labels, m).astype(np.float32))


def test_loss_is_zero_when_the_prediction_is_the_target(fitted):
    labels = grouped_labels(5, GROUPS, n=16)
    loss = fitted.loss()
    goal = torch.from_numpy(targets(label_matrix_sparse(labels, 11), fitted.embedding))
    assert float(loss(goal, multi_hot(labels, 11))) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(3.0 * goal, goal)) == pytest.approx(0.0, abs=1e-6)  # n x k targets; scale-free
    assert float(loss(-goal, goal)) == pytest.approx(2.0, abs=1e-6)


def test_loss_of_multi_hot_targets_is_one_minus_mean_cosine(fitted):
    torch.manual_seed(0)
    labels = grouped_labels(6, GROUPS, n=12)
    outputs = torch.randn(12, 6)
    goal = multi_hot(labels, 11) @ torch.from_numpy(fitted.embedding)
    expected = 1 - torch.nn.functional.cosine_similarity(outputs, goal, dim=1).mean()
    assert float(fitted.loss()(outputs, multi_hot(labels, 11))) == pytest.approx(float(expected), abs=1e-6)


def test_loss_gradient_is_finite_and_non_zero(fitted):
    torch.manual_seed(1)
    outputs = torch.randn(8, 6, requires_grad=True)
    fitted.loss()(outputs, multi_hot(grouped_labels(7, GROUPS, n=8), 11)).backward()
    assert torch.isfinite(outputs.grad).all() and outputs.grad.abs().sum() > 0


def test_loss_is_float32_under_bf16_autocast(fitted):
    torch.manual_seed(2)
    head = torch.nn.Linear(10, 6)
    features = torch.randn(8, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = head(features)
        assert outputs.dtype == torch.bfloat16
        loss = fitted.loss()(outputs, multi_hot(grouped_labels(8, GROUPS, n=8), 11))
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0


def test_samples_without_labels_are_left_out_of_the_mean(fitted):
    torch.manual_seed(3)
    labels = grouped_labels(9, GROUPS, n=6)
    outputs = torch.randn(8, 6, requires_grad=True)
    with_empty = fitted.loss()(outputs, multi_hot(labels + [(), ()], 11))
    alone = fitted.loss()(outputs[:6], multi_hot(labels, 11))
    assert with_empty.item() == pytest.approx(alone.item(), abs=1e-6)
    with_empty.backward()
    assert outputs.grad[6:].abs().sum() == 0
    nothing = fitted.loss()(outputs, torch.zeros(8, 11))
    assert nothing.item() == 0.0


def test_loss_rejects_outputs_of_the_wrong_width(fitted):
    with pytest.raises(ValueError, match="out_dim"):
        fitted.loss()(torch.randn(4, 11), torch.zeros(4, 11))
    with pytest.raises(ValueError, match="multi-hot"):
        CosineProximityLoss(fitted.embedding)(torch.randn(4, 6), torch.zeros(4, 5))


# -- persistence and plots -------------------------------------------------------------------------------
def test_save_load_round_trip(fitted, tmp_path):
    fitted.label_names = np.array([f"/m/{i:03d}" for i in range(11)])
    path = fitted.save(tmp_path / "sub" / "label_embedding.npz")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    loaded = LabelEmbedding.load(path)
    for name in ("embedding", "label_names", "support", "singular_values", "eigen_signs"):
        expected = getattr(fitted, name)
        assert getattr(loaded, name).dtype == expected.dtype, name
        np.testing.assert_array_equal(getattr(loaded, name), expected, err_msg=name)
    for name in ("n_samples", "positive", "smoothing", "dim", "seed"):
        assert getattr(loaded, name) == getattr(fitted, name), name
    outputs = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    np.testing.assert_array_equal(loaded.decode(outputs), fitted.decode(outputs))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        LabelEmbedding.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(PipelineError, match=r"other\.npz is not a label embedding file"):
        LabelEmbedding.load(tmp_path / "other.npz")


def test_plots_are_written(fitted, tmp_path):
    E = np.vstack([fitted.embedding, np.zeros((1, 6), np.float32)])
    support = np.append(fitted.support, 0)
    heatmap = plot_similarity_heatmap(E, tmp_path / "similarity.png", max_labels=8, support=support)
    label_map = plot_label_map(E, tmp_path / "map.png", support=support)
    for path in (heatmap, label_map):
        assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"
