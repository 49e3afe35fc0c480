"""The linear system that pins down the input of one Conv2d layer (R-GAP, Zhu & Blaschko, ICLR '21).

For a layer ``out = conv(x, w) + b`` (stride s, zero padding, one sample) with the loss gradient
``k = ∂ℓ/∂out`` known, the unknown is the zero-padded input ``x_pad`` (C_in × H_p × W_p). Three
blocks of linear equations hold (R-GAP's view of a convolution as a circulant matrix):

* gradient constraints, ``C_out·C_in·k_h·k_w`` rows:
  ``∇w[f, c, u, v] = Σ_p k[f, p] · x_pad[c, s·p + (u, v)]``;
* weight constraints, ``C_out·H_out·W_out`` rows (optionally only a selected subset, e.g. the
  active outputs of a ReLU layer): the unrolled convolution, ``W x_pad = out − b``;
* padding constraints, one row per padded entry: ``x_pad[e] = 0``.

:func:`constraint_blocks` builds the three blocks literally (sparse). :class:`ConvSystem` solves
and ranks an exactly equivalent, smaller form, all in float64:

* Padding entries are fixed to zero and their columns dropped. The padding rows are unit rows,
  so ``rank(A) = #padding + rank(B)`` with ``B = [K; W]`` on the interior columns, and on
  consistent data (one sample, no noise) the least-squares solutions coincide.
* The gradient block is ``I_{C_in} ⊗ K_0`` up to a row permutation: the equations for input
  channel ``c`` read only channel ``c``, all through the same matrix ``K_0`` (rows ``(f, u, v)``,
  columns the pixels of one channel). So ``BᵀB = I ⊗ K_0ᵀK_0 + WᵀW`` is cheap to form.
* Solve (:meth:`ConvSystem.solve`): the gradient rows' own solution when a bound certifies it
  as the joint least-squares solution to float64 precision (consistent data); else the normal
  equations ``BᵀB x = Bᵀb`` by Cholesky when ``BᵀB`` is well conditioned (LAPACK condition
  estimate), refined on the literal residual ``b − Bx``; this reproduces the least-squares
  solution to ~1e-15 relative. A rank-deficient layer gets the minimum-norm least-squares
  solution (as R-GAP's ``np.linalg.lstsq``): its exact null space is lifted out of ``BᵀB``
  before the Cholesky, or, if that is still ill conditioned, LAPACK ``gelsd`` solves
  ``[I ⊗ R_0; W]`` (``K_0 = Q_0 R_0``, right-hand side ``Q_0ᵀ ∇w``). ``W`` and ``WᵀW`` depend
  on the weights only and are cached per layer (the server's model is fixed within a round).
* Rank: ``rank(B) = rank(K) + rank(W N)`` with ``N = I ⊗ N_0`` an orthonormal basis of
  ``null(K)`` (``N_0`` from the SVD of the small block ``K_0``). Each rank is counted by SVD with
  numpy's default tolerance ``σ_max · max(M, N) · ε(float64)``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch
from torch import nn


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes of one Conv2d layer applied to a single (C_in, H, W) input."""

    in_channels: int
    out_channels: int
    in_hw: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]

    @staticmethod
    def check(conv: nn.Conv2d) -> None:
        """Raise ValueError for the Conv2d variants the system does not model."""
        if conv.groups != 1 or tuple(conv.dilation) != (1, 1):
            raise ValueError("grouped or dilated convolutions are not supported")
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError("only explicit zero padding is supported")

    @classmethod
    def of(cls, conv: nn.Conv2d, in_hw: tuple[int, int]) -> ConvGeometry:
        """Geometry of ``conv`` on inputs of spatial size ``in_hw``."""
        cls.check(conv)
        return cls(
            conv.in_channels,
            conv.out_channels,
            (int(in_hw[0]), int(in_hw[1])),
            (int(conv.kernel_size[0]), int(conv.kernel_size[1])),
            (int(conv.stride[0]), int(conv.stride[1])),
            (int(conv.padding[0]), int(conv.padding[1])),
        )

    @property
    def padded_hw(self) -> tuple[int, int]:
        return self.in_hw[0] + 2 * self.padding[0], self.in_hw[1] + 2 * self.padding[1]

    @property
    def out_hw(self) -> tuple[int, int]:
        (hp, wp), (kh, kw), (sh, sw) = self.padded_hw, self.kernel, self.stride
        return (hp - kh) // sh + 1, (wp - kw) // sw + 1

    @property
    def unknowns_padded(self) -> int:
        return self.in_channels * self.padded_hw[0] * self.padded_hw[1]

    @property
    def unknowns_interior(self) -> int:
        return self.in_channels * self.in_hw[0] * self.in_hw[1]

    @property
    def padding_rows(self) -> int:
        return self.unknowns_padded - self.unknowns_interior

    @property
    def gradient_rows(self) -> int:
        return self.out_channels * self.in_channels * self.kernel[0] * self.kernel[1]

    @property
    def weight_rows(self) -> int:
        return self.out_channels * self.out_hw[0] * self.out_hw[1]

    @cached_property
    def window(self) -> np.ndarray:
        """``window[i, j, u, v]``: flat padded-grid index read by output (i, j) at offset (u, v)."""
        (ho, wo), (kh, kw), (sh, sw) = self.out_hw, self.kernel, self.stride
        rows = sh * np.arange(ho)[:, None] + np.arange(kh)[None, :]  # (ho, kh)
        cols = sw * np.arange(wo)[:, None] + np.arange(kw)[None, :]  # (wo, kw)
        return rows[:, None, :, None] * self.padded_hw[1] + cols[None, :, None, :]

    @cached_property
    def interior_columns(self) -> np.ndarray:
        """Columns of the interior (non-padding) unknowns in the (c, padded grid) layout."""
        grid = self.padded_hw[0] * self.padded_hw[1]
        inner = np.flatnonzero(self.interior_index >= 0)
        return (np.arange(self.in_channels)[:, None] * grid + inner[None, :]).ravel()

    @cached_property
    def interior_index(self) -> np.ndarray:
        """Per padded-grid position of one channel: its interior pixel index, or -1 for padding."""
        (hp, wp), (h, w), (ph, pw) = self.padded_hw, self.in_hw, self.padding
        index = np.full((hp, wp), -1, dtype=np.int64)
        index[ph : ph + h, pw : pw + w] = np.arange(h * w).reshape(h, w)
        return index.ravel()


def gradient_block(geom: ConvGeometry, k: np.ndarray) -> sp.csr_matrix:
    """``K_0``: rows (f, u, v), columns the padded grid of ONE input channel.

    The gradient constraints of every input channel use this same matrix:
    ``∇w[:, c].ravel() = K_0 · x_pad[c].ravel()``.
    """
    k = np.asarray(k, dtype=np.float64).reshape(geom.out_channels, *geom.out_hw)
    (kh, kw), f_count = geom.kernel, geom.out_channels
    f, i, j, u, v = np.meshgrid(
        np.arange(f_count),
        np.arange(geom.out_hw[0]),
        np.arange(geom.out_hw[1]),
        np.arange(kh),
        np.arange(kw),
        indexing="ij",
    )
    rows = (f * kh + u) * kw + v
    cols = geom.window[i, j, u, v]
    shape = (f_count * kh * kw, geom.padded_hw[0] * geom.padded_hw[1])
    return sp.csr_matrix((k[f, i, j].ravel(), (rows.ravel(), cols.ravel())), shape=shape)


def weight_constraints(
    geom: ConvGeometry, weight: np.ndarray, row_mask: np.ndarray | None = None
) -> sp.csr_matrix:
    """The unrolled convolution on the padded input: rows (f, i, j), columns (c, padded grid).

    ``row_mask`` (shape C_out × H_out × W_out, bool) keeps only the selected output units, e.g.
    those whose pre-activation is known.
    """
    weight = np.asarray(weight, dtype=np.float64)
    (ho, wo), (kh, kw), grid = geom.out_hw, geom.kernel, geom.padded_hw[0] * geom.padded_hw[1]
    f, i, j, c, u, v = np.meshgrid(
        np.arange(geom.out_channels),
        np.arange(ho),
        np.arange(wo),
        np.arange(geom.in_channels),
        np.arange(kh),
        np.arange(kw),
        indexing="ij",
    )
    rows = (f * ho + i) * wo + j
    cols = c * grid + geom.window[i, j, u, v]
    matrix = sp.csr_matrix(
        (weight[f, c, u, v].ravel(), (rows.ravel(), cols.ravel())),
        shape=(geom.weight_rows, geom.in_channels * grid),
    )
    return matrix if row_mask is None else matrix[np.asarray(row_mask).ravel()]


def padding_constraints(geom: ConvGeometry) -> sp.csr_matrix:
    """One unit row per padded entry of ``x_pad`` (all channels)."""
    grid = geom.padded_hw[0] * geom.padded_hw[1]
    pad = np.flatnonzero(geom.interior_index < 0)
    cols = (np.arange(geom.in_channels)[:, None] * grid + pad[None, :]).ravel()
    return sp.csr_matrix(
        (np.ones(cols.size), (np.arange(cols.size), cols)),
        shape=(cols.size, geom.in_channels * grid),
    )


def constraint_blocks(
    geom: ConvGeometry, weight: np.ndarray, k: np.ndarray, row_mask: np.ndarray | None = None
) -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix]:
    """R-GAP's literal blocks ``(K, W, P)`` over ``x_pad`` flattened as (c, padded grid).

    ``K``'s rows follow ``∇w.ravel()`` (order f, c, u, v).
    """
    k_block = gradient_block(geom, k)
    kh_kw = geom.kernel[0] * geom.kernel[1]
    # Per-channel blocks on the diagonal, rows then reordered from (c, f, u, v) to (f, c, u, v).
    stacked = sp.block_diag([k_block] * geom.in_channels, format="csr")
    c, f, uv = np.meshgrid(
        np.arange(geom.in_channels), np.arange(geom.out_channels), np.arange(kh_kw), indexing="ij"
    )
    order = np.empty(stacked.shape[0], dtype=np.int64)
    order[((f * geom.in_channels + c) * kh_kw + uv).ravel()] = np.arange(stacked.shape[0])
    return stacked[order], weight_constraints(geom, weight, row_mask), padding_constraints(geom)


def svd_rank(matrix: np.ndarray, rows: int | None = None) -> tuple[int, float]:
    """Rank by SVD with numpy's default tolerance ``σ_max · max(M, N) · ε(float64)``.

    ``rows`` overrides M when ``matrix`` is an orthogonally compressed stand-in for a taller one.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.size == 0:
        return 0, 0.0
    sigma = torch.linalg.svdvals(torch.from_numpy(matrix)).numpy()
    m = matrix.shape[0] if rows is None else rows
    tol = float(sigma[0] * max(m, matrix.shape[1]) * np.finfo(np.float64).eps)
    return int(np.count_nonzero(sigma > tol)), tol


# The normal equations are used when the reciprocal condition number of AᵀA exceeds this
# (κ(A) below ~3e6): iterative refinement on the literal residual then contracts the error by
# about κ(A)²·ε per step (a few steps reach the float64 least-squares solution). Below it the
# SVD-based minimum-norm solver takes over.
_MIN_GRAM_RCOND = 1e-13
_MAX_REFINEMENT_STEPS = 4
# Relative error bound at which the gradient-rows-only solution counts as the joint solution.
_CERTIFICATE = 1e-12


@dataclass
class ConvSolution:
    """A solved layer: its input (C_in, H, W) and diagnostics of the fit."""

    x: np.ndarray
    method: str  # which step of ConvSystem.solve produced it
    rank: int  # rank(A) of R-GAP's literal system, padding rows included
    unknowns: int  # unknowns including padding
    relative_residual: float  # ‖A x − b‖ / ‖b‖ over the gradient and weight constraints


class ConvSystem:
    """R-GAP's system for one conv layer with padding fixed to zero (see the module docstring).

    ``k`` is ∂ℓ/∂out (C_out, H_out, W_out); ``row_mask`` selects the weight constraints to keep.
    """

    def __init__(
        self,
        geom: ConvGeometry,
        weight: np.ndarray,
        k: np.ndarray,
        row_mask: np.ndarray | None = None,
    ) -> None:
        self.geom = geom
        self.row_mask = None if row_mask is None else np.asarray(row_mask, dtype=bool).ravel()
        interior = geom.interior_index >= 0
        self.gradient_block = gradient_block(geom, k)[:, interior].toarray()  # K_0, interior
        self._weight_terms = _weight_terms(geom, weight, self.row_mask)
        self.weight_block = self._weight_terms.block

    @property
    def weight_rows(self) -> int:
        return self.weight_block.shape[0]

    def _split(self, x: np.ndarray) -> np.ndarray:
        """Interior unknowns as a (pixels, C_in) matrix, the layout K_0 acts on."""
        return x.reshape(self.geom.in_channels, -1).T

    def _residuals(
        self, x: np.ndarray, grad_per_channel: np.ndarray, weight_rhs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        return grad_per_channel - self.gradient_block @ self._split(x), weight_rhs - (
            self.weight_block @ x
        )

    def _normal_rhs(self, grad_residual: np.ndarray, weight_residual: np.ndarray) -> np.ndarray:
        return (self.gradient_block.T @ grad_residual).T.ravel() + self.weight_block.T @ (
            weight_residual
        )

    def _gram(self) -> np.ndarray:
        gram = self._weight_terms.weight_gram().copy()
        block = self.gradient_block.T @ self.gradient_block
        n = block.shape[0]
        for c in range(self.geom.in_channels):
            gram[c * n : (c + 1) * n, c * n : (c + 1) * n] += block
        return gram

    def rhs(
        self, grad_weight: np.ndarray, out: np.ndarray, bias: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``∇w`` as a (f·u·v, C_in) matrix and ``out − b`` on the selected output units."""
        geom = self.geom
        grad = np.asarray(grad_weight, dtype=np.float64).reshape(
            geom.out_channels, geom.in_channels, -1
        )
        grad_per_channel = grad.transpose(0, 2, 1).reshape(-1, geom.in_channels)
        weight_rhs = np.asarray(out, dtype=np.float64).reshape(geom.out_channels, -1)
        if bias is not None:
            weight_rhs = weight_rhs - np.asarray(bias, dtype=np.float64)[:, None]
        weight_rhs = weight_rhs.ravel()
        if self.row_mask is not None:
            weight_rhs = weight_rhs[self.row_mask]
        return grad_per_channel, weight_rhs

    def solve(
        self, grad_weight: np.ndarray, out: np.ndarray, bias: np.ndarray | None = None
    ) -> ConvSolution:
        """Least-squares layer input from ``∇w`` and the pre-activation output ``out``.

        With a bias the weight constraints read ``W x = out − b``. In order:

        1. When the gradient rows alone have full column rank (``M = K_0ᵀK_0`` positive
           definite), their own solution ``x_g`` (one small HW×HW system for all channels) is
           tried. It is accepted only with a certificate that it is the joint least-squares
           solution ``x*`` to float64 precision: ‖B(x_g − x*)‖² = f(x_g) − f(x*) ≤ f(x_g), so
           ``‖x_g − x*‖ ≤ ‖B x_g − b‖ / σ_min(K_0)``, required ≤ 1e-12·‖x_g‖. That holds on
           consistent data (an exact single-sample update); otherwise step 2 runs.
        2. The normal equations (Cholesky, refined on the literal residual) when BᵀB is well
           conditioned.
        3. A rank-deficient layer gets the minimum-norm solution: its exact null space (from
           :meth:`null_space`) is lifted out of BᵀB first; if BᵀB is still ill conditioned,
           LAPACK ``gelsd`` on the reduced dense matrix decides.
        """
        geom = self.geom
        grad_per_channel, weight_rhs = self.rhs(grad_weight, out, bias)
        rank, method = geom.unknowns_interior, "gradient constraints, certified"
        x = self._certified_gradient_solution(grad_per_channel, weight_rhs)
        if x is None:
            gram = self._gram()
            method = "normal-equations"
            factor = _cholesky(gram)
            if factor is None:
                rank, _, null_basis = self.null_space(basis=True)
                # Bᵀb has no component in null(B), so adding a multiple of the projector onto
                # the null space leaves the minimum-norm least-squares solution unchanged.
                lift = float(np.abs(np.diag(gram)).max()) or 1.0
                factor = _cholesky(gram + lift * (null_basis @ null_basis.T))
                method = "normal-equations, null space removed"
            if factor is not None:
                x = np.zeros(geom.unknowns_interior)
                for _ in range(_MAX_REFINEMENT_STEPS):
                    residual = self._residuals(x, grad_per_channel, weight_rhs)
                    step = _cholesky_solve(factor, self._normal_rhs(*residual))
                    x = x + step
                    if np.linalg.norm(step) <= 4 * np.finfo(np.float64).eps * np.linalg.norm(x):
                        break
            else:
                method = "lstsq"
                x, rank = self._dense_lstsq(grad_per_channel, weight_rhs)
        grad_res, weight_res = self._residuals(x, grad_per_channel, weight_rhs)
        scale = np.sqrt(np.sum(grad_per_channel**2) + np.sum(weight_rhs**2)) or 1.0
        return ConvSolution(
            x=x.reshape(geom.in_channels, *geom.in_hw),
            method=method,
            rank=int(rank) + geom.padding_rows,
            unknowns=geom.unknowns_padded,
            relative_residual=float(np.sqrt(np.sum(grad_res**2) + np.sum(weight_res**2)) / scale),
        )

    def _certified_gradient_solution(
        self, grad_per_channel: np.ndarray, weight_rhs: np.ndarray
    ) -> np.ndarray | None:
        """``x_g`` from the gradient rows alone, if certified optimal for the joint system."""
        k_block = self.gradient_block
        if k_block.shape[0] < k_block.shape[1]:
            return None
        small = k_block.T @ k_block
        lowest = float(scipy.linalg.eigvalsh(small, subset_by_index=[0, 0], check_finite=False)[0])
        if not lowest > _MIN_GRAM_RCOND * float(np.abs(small).sum(axis=0).max()):
            return None
        solution = scipy.linalg.solve(small, k_block.T @ grad_per_channel, assume_a="pos")
        x = solution.T.ravel()
        grad_res, weight_res = self._residuals(x, grad_per_channel, weight_rhs)
        misfit = np.sqrt(np.sum(grad_res**2) + np.sum(weight_res**2))
        return x if misfit <= _CERTIFICATE * np.sqrt(lowest) * np.linalg.norm(x) else None

    def _dense_lstsq(
        self, grad_per_channel: np.ndarray, weight_rhs: np.ndarray
    ) -> tuple[np.ndarray, int]:
        """Minimum-norm solution of ``[I ⊗ R_0; W] x = [I ⊗ Q_0ᵀ · ∇w; out − b]`` by ``gelsd``."""
        k_block, grad_rhs = self.gradient_block, grad_per_channel
        if k_block.shape[0] > k_block.shape[1]:
            q, k_block = np.linalg.qr(k_block)
            grad_rhs = q.T @ grad_per_channel
        dense = np.vstack(
            [np.kron(np.eye(self.geom.in_channels), k_block), self.weight_block.toarray()]
        )
        b = np.concatenate([grad_rhs.T.ravel(), weight_rhs])
        literal_rows = self.geom.gradient_rows + self.weight_rows
        cond = max(literal_rows, dense.shape[1]) * np.finfo(np.float64).eps
        x, _, rank, _ = scipy.linalg.lstsq(
            dense, b, cond=cond, lapack_driver="gelsd", check_finite=False
        )
        return x, int(rank)

    def null_space(self, basis: bool = False) -> tuple[int, str, np.ndarray | None]:
        """``rank(B)`` of the interior system, the tolerances used and optionally a null basis.

        rank([K; W]) = rank(K) + rank(W N), N an orthonormal basis of null(K), and
        null([K; W]) = N · null(W N). K = I ⊗ K_0, so N = I ⊗ N_0 with N_0 from the SVD of the
        small per-channel block K_0. Both ranks are counted by SVD with numpy's default
        tolerance σ_max · max(M, N) · ε(float64).
        """
        geom, eps = self.geom, np.finfo(np.float64).eps
        k_block = self.gradient_block
        _, sigma, vt = _svd(k_block)
        tol_k = float(sigma[0] * max(k_block.shape) * eps) if sigma.size else 0.0
        rank_k = int(np.count_nonzero(sigma > tol_k))
        n0 = vt[rank_k:].T  # (pixels, null dimension of K_0)
        pixels, channels = n0.shape[0], geom.in_channels
        rank_wn, tol_wn, null_wn = 0, 0.0, np.eye(channels * n0.shape[1])
        if n0.shape[1] and self.weight_rows:
            w = self.weight_block.tocsc()
            wn = np.hstack([w[:, c * pixels : (c + 1) * pixels] @ n0 for c in range(channels)])
            if basis:
                _, sigma_wn, vt_wn = _svd(wn)
            else:
                sigma_wn = torch.linalg.svdvals(torch.from_numpy(wn)).numpy()
            tol_wn = float(sigma_wn[0] * max(wn.shape) * eps)
            rank_wn = int(np.count_nonzero(sigma_wn > tol_wn))
            if basis:
                null_wn = vt_wn[rank_wn:].T
        rank = channels * rank_k + rank_wn
        tolerance = f"K_0: {tol_k:.1e}, W·N: {tol_wn:.1e}"
        if not basis:
            return rank, tolerance, None
        null_basis = np.kron(np.eye(channels), n0) @ null_wn
        return rank, tolerance, null_basis

    def rank(self) -> int:
        """``rank(A)`` of R-GAP's literal system: ``rank(B) + #padding`` (:meth:`null_space`)."""
        return self.null_space()[0] + self.geom.padding_rows


@dataclass
class _WeightTerms:
    """What depends on the weights only: the weight block W and, once needed, WᵀW."""

    block: sp.csr_matrix
    gram: np.ndarray | None = None

    def weight_gram(self) -> np.ndarray:
        if self.gram is None:
            w = self.block
            if w.nnz > 0.05 * w.shape[0] * w.shape[1]:
                dense = torch.from_numpy(w.toarray())
                self.gram = (dense.T @ dense).numpy()
            else:
                self.gram = (w.T @ w).toarray()
            _trim_weight_terms()
        return self.gram


# Weight blocks and their Gram matrices, reused across the candidates of a trial and across
# trials on the same model (the server's model is fixed within a round); least recently used
# entries go first once the Gram matrices exceed the byte budget.
_WEIGHT_TERMS: OrderedDict[tuple[object, ...], _WeightTerms] = OrderedDict()
_WEIGHT_TERMS_BYTES = 512 * 2**20


def _weight_terms(
    geom: ConvGeometry, weight: np.ndarray, row_mask: np.ndarray | None
) -> _WeightTerms:
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    mask_key = None if row_mask is None else hashlib.sha256(np.packbits(row_mask)).hexdigest()
    key = (geom, hashlib.sha256(weight.tobytes()).hexdigest(), mask_key)
    terms = _WEIGHT_TERMS.get(key)
    if terms is None:
        block = weight_constraints(geom, weight, row_mask)[:, geom.interior_columns]
        terms = _WEIGHT_TERMS[key] = _WeightTerms(block)
    _WEIGHT_TERMS.move_to_end(key)
    return terms


def _trim_weight_terms() -> None:
    while len(_WEIGHT_TERMS) > 1 and (
        sum(t.gram.nbytes for t in _WEIGHT_TERMS.values() if t.gram is not None)
        > _WEIGHT_TERMS_BYTES
    ):
        _WEIGHT_TERMS.popitem(last=False)


def _svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full SVD (``U, σ, Vᵀ``) through torch, whose thread count the caller controls."""
    u, sigma, vt = torch.linalg.svd(torch.from_numpy(matrix), full_matrices=True)
    return u.numpy(), sigma.numpy(), vt.numpy()


def _cholesky(gram: np.ndarray) -> np.ndarray | None:
    """Lower Cholesky factor of ``gram``, or None when it is not numerically positive definite.

    The factorisation runs in torch (faster here than numpy's, and its thread count is the
    caller's); the condition estimate comes from LAPACK ``dpocon``.
    """
    factor, info = torch.linalg.cholesky_ex(torch.from_numpy(gram))
    if int(info) != 0:
        return None
    factor_np = factor.numpy()
    rcond, info = scipy.linalg.lapack.dpocon(factor_np, np.abs(gram).sum(axis=0).max(), uplo="L")
    return factor_np if info == 0 and rcond > _MIN_GRAM_RCOND else None


def _cholesky_solve(factor: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``L Lᵀ x = rhs`` for a lower triangular ``L``."""
    half = scipy.linalg.solve_triangular(factor, rhs, lower=True, check_finite=False)
    return scipy.linalg.solve_triangular(factor.T, half, lower=False, check_finite=False)
