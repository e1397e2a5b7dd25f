"""Information-theoretical label embeddings (Chollet, arXiv 1607.05691) for many-label data sets.

Labels are placed on the unit sphere of R^k so that labels which co-occur more than chance point the
same way. The network regresses, for each image, the normalised sum of its labels' embeddings with a
cosine-proximity loss (a k-dim head instead of an m-dim one, e.g. 300 instead of 7 178 for Google
Inclusive Images), and predictions are decoded back to m per-label scores by cosine similarity.

Pipeline, all on ``scipy.sparse`` so that 1.7 M images x 7 178 labels take seconds::

    M   = label_matrix_sparse(labels, m)          n x m binary
    PMI = pmi_matrix(M, positive=True)            m x m, only co-occurring pairs stored
    E   = embed(PMI, dim=300)                     m x k, unit rows
    Y   = targets(M, E)                           n x k regression targets (the loss does this per batch)
    scores = decode(outputs, E)                   n x m in [0, 1], for the threshold strategies

:class:`LabelEmbedding` bundles E with its label order and options, saved as one ``.npz`` so that
training and prediction decode with the same embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from sklearn.utils.extmath import randomized_svd, svd_flip
from torch import nn

from src.config import PipelineError
from src.data import label_csr
from src.files import write_atomic
from src.metrics import binary_csr, ranked_top
from src.progress import note

FORMAT_VERSION = 1
# Below this many labels (or when dim is a large share of them) an exact dense SVD is cheap and exact.
EXACT_SVD_MAX_LABELS = 1024


# -- label matrix and PMI ------------------------------------------------------------------------------
def label_matrix_sparse(labels: Sequence[Sequence[int]], num_labels: int,
                        dtype: np.dtype = np.float32) -> sparse.csr_matrix:
    """The n x ``num_labels`` binary CSR matrix of a label column (one sequence of class indices per
    sample, as the ``labels`` column of the data tables), in ``dtype``: :func:`src.data.label_csr`."""
    return label_csr(labels, num_labels, dtype)


def cooccurrence(M) -> sparse.csr_matrix:
    """C = M^T M of a binary n x m label matrix: C_ij = samples having both i and j, C_ii = support of i.

    Integer counts (int32 while n fits, else int64), so they are exact at any n.
    """
    count_dtype = np.int32 if M.shape[0] < np.iinfo(np.int32).max else np.int64
    B = binary_csr(M, count_dtype)
    C = (B.T.tocsr() @ B).tocsr()
    C.sort_indices()
    return C


def pmi_matrix(M, positive: bool = True, smoothing: float = 0.0) -> sparse.csr_matrix:
    """Pointwise mutual information of every co-occurring label pair: an m x m symmetric float32 CSR.

    With C = M^T M (``M`` binary n x m; any non-zero counts as 1) and s = ``smoothing``::

        PMI_ij = log( n * C_ij / ((C_ii + s) * (C_jj + s)) )      for C_ij > 0, diagonal included

    i.e. log p(i, j) / (p(i) p(j)) with the marginal counts C_ii raised by the pseudo-count s (n and
    C_ij unchanged). Smoothing lowers PMI_ij by log(1 + s / C_ii) + log(1 + s / C_jj): next to nothing
    for frequent labels, a lot for rare ones, whose raw PMI is inflated (two labels seen once, together,
    get log n); with ``positive=True`` such pairs may drop out.
    The diagonal PMI_ii = log(n C_ii / (C_ii + s)^2) is the label's self-information -log p(i) when
    s = 0; it keeps each label's own direction in the embedding.

    Pairs that never co-occur (PMI = -inf) are not stored, i.e. 0, the usual sparse "PMI_0"
    convention; with ``positive=True`` (PPMI) negative values are dropped as well, so only pairs that
    co-occur more than chance are stored. Stored exact zeros are removed. A label that never occurs has
    an empty row and column.
    """
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    n, m = M.shape
    C = cooccurrence(M)
    support = C.diagonal().astype(np.float64)
    rows = np.repeat(np.arange(m, dtype=np.int32), np.diff(C.indptr))
    with np.errstate(divide="ignore"):  # unseen labels with s = 0: log 0, but they have no entries
        log_marginal = np.log(support + smoothing)
    values = np.log(C.data.astype(np.float64))
    values += np.log(n)
    values -= log_marginal[rows]
    values -= log_marginal[C.indices]
    keep = values > 0 if positive else values != 0
    kept_per_row = np.bincount(rows[keep], minlength=m)
    indptr = np.zeros(m + 1, dtype=C.indptr.dtype)
    np.cumsum(kept_per_row, out=indptr[1:])
    return sparse.csr_matrix((values[keep].astype(np.float32), C.indices[keep], indptr), shape=(m, m))


# -- embedding -----------------------------------------------------------------------------------------
def _normalize_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero (float32)."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)


def truncated_svd(pmi, dim: int, seed: int = 0, method: Literal["auto", "exact", "randomized"] = "auto",
                  n_iter: int | str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``dim`` leading singular triplets of the symmetric ``pmi``: (U m x dim, singular values
    descending, sign of the eigenvalue behind each: +1 / -1).

    ``method="exact"`` is a dense LAPACK SVD (``auto`` picks it for m <= max(1024, 4 dim)); otherwise a
    randomized SVD (Halko et al.; sklearn's ``randomized_svd``, ``n_iter`` power iterations) on the sparse
    matrix as it is; it is densified only when the dense float32 matrix takes no more memory than the
    CSR one (density >= 1/2). Signs are deterministic (sklearn's ``svd_flip``).
    """
    m = pmi.shape[0]
    if pmi.shape != (m, m):
        raise ValueError(f"the PMI matrix must be square, got {pmi.shape}")
    if not 1 <= dim <= m:
        raise ValueError(f"dim must be in 1..{m} (the number of labels), got {dim}")
    if method == "auto":
        method = "exact" if m <= max(EXACT_SVD_MAX_LABELS, 4 * dim) else "randomized"
    if method == "exact":
        dense = pmi.toarray() if sparse.issparse(pmi) else np.asarray(pmi)
        U, S, Vt = np.linalg.svd(dense.astype(np.float64))
        U, S, Vt = U[:, :dim], S[:dim], Vt[:dim]
        U, Vt = svd_flip(U, Vt)
    elif method == "randomized":
        matrix = pmi
        if sparse.issparse(pmi):
            matrix = sparse.csr_matrix(pmi, dtype=np.float32)
            if matrix.nnz >= m * m / 2:
                matrix = matrix.toarray()
        else:
            matrix = np.asarray(pmi, dtype=np.float32)
        U, S, Vt = randomized_svd(matrix, dim, n_iter=n_iter, random_state=seed)
    else:
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    # For a symmetric matrix, v_j = sign(lambda_j) u_j: the sign of u_j . v_j is the eigenvalue's sign.
    signs = np.where(np.einsum("ij,ji->j", U, Vt) < 0, -1, 1).astype(np.int8)
    return U.astype(np.float32), S.astype(np.float32), signs


def embed(pmi, dim: int, seed: int = 0, *, normalize: bool = True,
          method: Literal["auto", "exact", "randomized"] = "auto", n_iter: int | str = "auto") -> np.ndarray:
    """Label embedding E = U_k sqrt(Sigma_k) (m x ``dim`` float32), rows L2-normalised unless
    ``normalize=False`` (then E E^T is the rank-k approximation discussed below).

    The PMI matrix is symmetric but indefinite (negative PMI, and even PPMI has negative eigenvalues).
    An SVD returns singular values |lambda| and, for a negative eigenvalue, U and V columns of opposite
    sign (v = -u). E = U sqrt(Sigma) keeps the magnitude and drops that sign, so in those directions
    E E^T approximates |PMI| (the matrix absolute value U |Lambda| U^T), not PMI: a strongly
    *negative* direction pulls labels together like a positive one. With positive PMI and its large
    positive diagonal (self-information) the leading directions are mostly positive-eigenvalue ones (1
    of 300 negative on the benchmark's synthetic Open Images-sized data);
    :func:`truncated_svd` returns the signs if you want to check (``LabelEmbedding.eigen_signs``).

    A label whose PMI row is empty (never seen, or nothing left after clipping) gets a zero row, which
    stays zero: decoding never predicts it. :func:`empty_labels` lists them.
    """
    U, S, _ = truncated_svd(pmi, dim, seed, method, n_iter)
    raw = _raw_embedding(pmi, U, S)
    return _normalize_rows(raw) if normalize else raw


def _empty_rows(pmi) -> np.ndarray:
    """Boolean mask of the all-zero rows of a (sparse or dense) square matrix."""
    if not sparse.issparse(pmi):
        return ~np.asarray(pmi).any(axis=1)
    csr = sparse.csr_matrix(pmi)
    if (csr.data == 0).any():  # stored zeros: count the real non-zeros (a copy, rarely needed)
        return np.asarray((csr != 0).sum(axis=1)).ravel() == 0
    return np.diff(csr.indptr) == 0


def _raw_embedding(pmi, U: np.ndarray, S: np.ndarray) -> np.ndarray:
    """U sqrt(S), with the rows of empty PMI rows exactly zero (not the ~1e-17 an SVD leaves there), so
    that "never seen" is unambiguous."""
    raw = U * np.sqrt(S)[None, :]
    raw[_empty_rows(pmi)] = 0.0
    return raw.astype(np.float32)


def empty_labels(E: np.ndarray) -> np.ndarray:
    """Indices of the labels with an all-zero embedding row (never seen when the embedding was fitted)."""
    return np.flatnonzero(~np.asarray(E).any(axis=1))


def targets(M, E: np.ndarray) -> np.ndarray:
    """Regression targets: the row-normalised M E (n x k float32); a sample without labels gets a zero row.

    For a whole data set this is n x k dense (1.7 M x 300 float32 is 2 GB): the loss computes it per batch.
    """
    if sparse.issparse(M):
        summed = sparse.csr_matrix(M, dtype=np.float32) @ np.asarray(E, dtype=np.float32)
    else:
        summed = np.asarray(M, dtype=np.float32) @ np.asarray(E, dtype=np.float32)
    return _normalize_rows(summed)


# -- loss ------------------------------------------------------------------------------------------------
class CosineProximityLoss(nn.Module):
    """1 - cos(output, target), averaged over the samples that have labels, in float32.

    Holds the m x k embedding as a (non-persistent) buffer. ``targets`` may be the multi-hot n x m
    matrix the training loop passes (turned into normalize(Y E) here, so the loop is unchanged) or
    ready n x k embedding targets; when m == k they are taken as multi-hot. A sample without labels has
    no direction to regress and is left out of the mean (if a batch has none, the loss is 0 with a zero
    gradient). No host sync: safe inside the training loop.
    """

    def __init__(self, embedding: np.ndarray | torch.Tensor, eps: float = 1e-8):
        super().__init__()
        embedding = torch.as_tensor(np.asarray(embedding, dtype=np.float32))
        if embedding.ndim != 2:
            raise ValueError(f"the embedding must be m x k, got shape {tuple(embedding.shape)}")
        self.register_buffer("embedding", embedding, persistent=False)
        self.eps = eps

    def embedding_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """n x k unit (or zero) targets from multi-hot n x m or raw n x k ``targets``."""
        num_labels, dim = self.embedding.shape
        targets = targets.float()
        if targets.ndim != 2 or targets.shape[1] not in (num_labels, dim):
            raise ValueError(f"targets must be n x {num_labels} (multi-hot) or n x {dim} (embedding), "
                             f"got {tuple(targets.shape)}")
        if targets.shape[1] == num_labels:
            targets = targets @ self.embedding
        return F.normalize(targets, dim=1, eps=self.eps)

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(outputs.device.type, enabled=False):
            outputs = outputs.float()
            if outputs.ndim != 2 or outputs.shape[1] != self.embedding.shape[1]:
                raise ValueError(f"outputs must be n x {self.embedding.shape[1]} (the embedding dim), "
                                 f"got {tuple(outputs.shape)}: build the model with out_dim=embedding dim")
            goal = self.embedding_targets(targets)
            cosine = (F.normalize(outputs, dim=1, eps=self.eps) * goal).sum(dim=1)
            has_labels = (goal != 0).any(dim=1)
            per_sample = torch.where(has_labels, 1 - cosine, torch.zeros_like(cosine))
            return per_sample.sum() / has_labels.sum().clamp_min(1)


# -- decoding --------------------------------------------------------------------------------------------
def decode(outputs: np.ndarray, E: np.ndarray, chunk_rows: int = 4096, out: np.ndarray | None = None) -> np.ndarray:
    """Per-label scores (n x m float32 in [0, 1]) of predictions in embedding space: (cos + 1) / 2 of
    each prediction with each label's embedding, so the threshold strategies work unchanged.

    A label with a zero embedding row (never seen) scores 0; a zero prediction scores 0.5 everywhere.
    Chunked over rows: memory beyond the result is one chunk of normalised predictions. ``out`` may be
    a preallocated (e.g. ``np.memmap``) n x m float32 array; 100 k x 7 178 is 2.9 GB.
    """
    outputs = np.asarray(outputs, dtype=np.float32)
    labels = _normalize_rows(E)
    n, m = len(outputs), len(labels)
    if outputs.ndim != 2 or outputs.shape[1] != labels.shape[1]:
        raise ValueError(f"outputs must be n x {labels.shape[1]} (the embedding dim), got {outputs.shape}")
    if out is None:
        out = np.empty((n, m), dtype=np.float32)
    elif out.shape != (n, m) or out.dtype != np.float32:
        raise ValueError(f"out must be a {n} x {m} float32 array, got {out.shape} {out.dtype}")
    unseen = empty_labels(labels)
    half_labels_t = np.ascontiguousarray(0.5 * labels.T)  # (cos + 1) / 2 = u . (e / 2) + 1/2: one pass less
    for start in range(0, n, chunk_rows):
        block = out[start:start + chunk_rows]
        np.matmul(_normalize_rows(outputs[start:start + chunk_rows]), half_labels_t, out=block)
        block += 0.5
        if len(unseen):
            block[:, unseen] = 0.0
    return out


def top_k(scores: np.ndarray, k: int, chunk_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best labels of each row: (indices n x k int32, scores n x k), best first. The ranking is
    :func:`src.metrics.ranked_top`, the pipeline's one top-k: among equal scores the lower label index comes
    first (a stable sort by descending score), also at the k-th place, where labels never seen in training
    all tie at score 0. Chunked over rows, so the temporaries stay a few chunk_rows x m arrays."""
    scores = np.asarray(scores)
    n, m = scores.shape
    k = min(k, m)
    indices = np.empty((n, k), dtype=np.int32)
    values = np.empty((n, k), dtype=scores.dtype)
    for start in range(0, n, chunk_rows):
        block = scores[start:start + chunk_rows]
        ranked = ranked_top(block, k)
        indices[start:start + chunk_rows] = ranked
        values[start:start + chunk_rows] = np.take_along_axis(block, ranked, axis=1)
    return indices, values


def decode_top_k(outputs: np.ndarray, E: np.ndarray, k: int, chunk_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_k` of :func:`decode` without the n x m matrix (for millions of images): memory is one
    chunk_rows x m block."""
    outputs = np.asarray(outputs, dtype=np.float32)
    k = min(k, len(E))
    indices = np.empty((len(outputs), k), dtype=np.int32)
    values = np.empty((len(outputs), k), dtype=np.float32)
    for start in range(0, len(outputs), chunk_rows):
        stop = start + chunk_rows
        indices[start:stop], values[start:stop] = top_k(decode(outputs[start:stop], E, chunk_rows), k, chunk_rows)
    return indices, values


# -- the fitted embedding, saved with the run ------------------------------------------------------------
@dataclass
class LabelEmbedding:
    """A fitted label embedding and what it was fitted with; ``save``/``load`` as one ``.npz``."""

    embedding: np.ndarray  # m x k float32, unit rows (zero rows: labels never seen)
    label_names: np.ndarray  # m str: the label order the rows follow
    support: np.ndarray  # m int64: samples per label in the fitting data
    singular_values: np.ndarray  # k float32, descending
    eigen_signs: np.ndarray  # k int8: sign of the PMI eigenvalue behind each direction
    n_samples: int
    positive: bool
    smoothing: float
    dim: int
    seed: int

    @property
    def num_labels(self) -> int:
        return len(self.embedding)

    @property
    def empty_labels(self) -> np.ndarray:
        return empty_labels(self.embedding)

    @classmethod
    def fit(cls, labels: Sequence[Sequence[int]], num_labels: int, dim: int = 300, positive: bool = True,
            smoothing: float = 0.0, seed: int = 0, label_names: Sequence[str] | None = None,
            method: Literal["auto", "exact", "randomized"] = "auto", verbose: bool = True) -> LabelEmbedding:
        """Fit on a label column (sequences of class indices; fit on the training fold only if the
        validation fold must stay unseen)."""
        M = label_matrix_sparse(labels, num_labels)
        pmi = pmi_matrix(M, positive=positive, smoothing=smoothing)
        U, S, signs = truncated_svd(pmi, dim, seed, method)
        raw = _raw_embedding(pmi, U, S)
        names = np.arange(num_labels).astype(str) if label_names is None else np.asarray(label_names, dtype=str)
        if len(names) != num_labels:
            raise ValueError(f"{len(names)} label names for {num_labels} labels")
        fitted = cls(embedding=_normalize_rows(raw), label_names=names,
                     support=np.asarray(M.sum(axis=0)).ravel().astype(np.int64), singular_values=S,
                     eigen_signs=signs, n_samples=M.shape[0], positive=positive, smoothing=float(smoothing),
                     dim=dim, seed=seed)
        unseen = fitted.empty_labels
        if verbose and len(unseen):
            shown = ", ".join(map(str, names[unseen[:10]])) + (", ..." if len(unseen) > 10 else "")
            note(f"warning: {len(unseen)} of {num_labels} labels have an empty PMI row (never seen, or no "
                 f"positive PMI left) and a zero embedding; they are never predicted: {shown}")
        return fitted

    def targets(self, labels_or_matrix) -> np.ndarray:
        """n x k regression targets of a label column or an n x m label matrix."""
        if sparse.issparse(labels_or_matrix) or getattr(labels_or_matrix, "ndim", 1) == 2:
            return targets(labels_or_matrix, self.embedding)
        return targets(label_matrix_sparse(labels_or_matrix, self.num_labels), self.embedding)

    def decode(self, outputs: np.ndarray, chunk_rows: int = 4096) -> np.ndarray:
        return decode(outputs, self.embedding, chunk_rows)

    def loss(self) -> CosineProximityLoss:
        return CosineProximityLoss(self.embedding)

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.npz, no pickles) atomically: a temporary file, then ``os.replace``."""
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, format_version=np.int64(FORMAT_VERSION), embedding=self.embedding.astype(np.float32),
                         label_names=self.label_names.astype(str), support=self.support.astype(np.int64),
                         singular_values=self.singular_values.astype(np.float32),
                         eigen_signs=self.eigen_signs.astype(np.int8), n_samples=np.int64(self.n_samples),
                         positive=np.bool_(self.positive), smoothing=np.float64(self.smoothing),
                         dim=np.int64(self.dim), seed=np.int64(self.seed))

        return write_atomic(path, write)

    @classmethod
    def load(cls, path: str | Path) -> LabelEmbedding:
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"label embedding {path} does not exist; fit and save one first")
        with np.load(path, allow_pickle=False) as archive:
            missing = {"format_version", "embedding", "label_names", "support", "singular_values", "eigen_signs",
                       "n_samples", "positive", "smoothing", "dim", "seed"} - set(archive.files)
            if missing:
                raise PipelineError(f"{path} is not a label embedding file: missing {sorted(missing)}")
            if int(archive["format_version"]) != FORMAT_VERSION:
                raise PipelineError(f"{path}: format version {int(archive['format_version'])}, "
                                    f"this code reads {FORMAT_VERSION}")
            return cls(embedding=archive["embedding"], label_names=archive["label_names"],
                       support=archive["support"], singular_values=archive["singular_values"],
                       eigen_signs=archive["eigen_signs"], n_samples=int(archive["n_samples"]),
                       positive=bool(archive["positive"]), smoothing=float(archive["smoothing"]),
                       dim=int(archive["dim"]), seed=int(archive["seed"]))
