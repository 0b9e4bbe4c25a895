"""Calibration: stream the inputs of the blocks to replace, cluster them, and compute the per-centre tensors.

Memory is bounded: each block keeps at most ``max_tokens`` input rows, sampled uniformly from every batch, never
all activations of the data set. Results are cached on disk under the hash of everything they depend on.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tmlp.taylor.basis import check_rank, data_basis, jacobian_basis
from tmlp.taylor.derivatives import (BlockDerivatives, SharedDerivatives, block_derivatives, jacobian_grams,
                              refuse_full_hessian, shared_derivatives)
from tmlp.errors import TmlpError
from tmlp.taylor.fit import CellSums, accumulate_, solve_cells
from tmlp.calibration.record import block_rows, get_module, stream_blocks
from tmlp.io import cache_path, save_torch
from tmlp.taylor.partition import (centres_from_projected, nearest_centre, partition_projection,
                            project)
from tmlp.spec import TaylorConfig

KMEANS_FULL_LIMIT = 100_000  # above this many rows, mini-batch K-means


@dataclass
class BlockCalibration:
    """What calibration produced for one block: centres [k, d_in], the per-centre tensors, and the partition's
    projection P [d_in, q] of the nearest-centre assignment (None: Euclidean in x; tmlp.taylor.partition)."""

    fqn: str
    centres: torch.Tensor
    derivatives: BlockDerivatives | SharedDerivatives
    n_tokens: int  # rows K-means saw
    projection: torch.Tensor | None = None

    def to_dict(self) -> dict:
        kind = "shared" if isinstance(self.derivatives, SharedDerivatives) else "dense"
        return {"centres": self.centres, "n_tokens": self.n_tokens, "kind": kind,
                "derivatives": asdict(self.derivatives), "projection": self.projection}

    @classmethod
    def from_dict(cls, fqn: str, d: dict) -> "BlockCalibration":
        kind = SharedDerivatives if d["kind"] == "shared" else BlockDerivatives
        return cls(fqn, d["centres"], kind(**d["derivatives"]), d["n_tokens"], d["projection"])


@torch.no_grad()
def collect_inputs(model: nn.Module, fqns: list[str], batches: Iterable[torch.Tensor], n_batches: int,
                   max_tokens: int, seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run ``model`` over ``batches`` and keep, for each block in ``fqns``, a uniform sample of at most
    ``max_tokens`` of its input rows; returns {fqn: [n, d_in] float32}."""
    per_batch = max(1, math.ceil(max_tokens / max(1, n_batches)))
    rng = torch.Generator().manual_seed(seed)
    kept: dict[str, list[torch.Tensor]] = {f: [] for f in fqns}

    def record(fqn: str, x: torch.Tensor, y: torch.Tensor) -> None:
        rows = x.float()
        if not torch.isfinite(rows).all():
            raise TmlpError(f"block {fqn} received NaN or Inf activations; check the checkpoint and the "
                            "input preprocessing")
        if rows.shape[0] > per_batch:
            rows = rows[torch.randperm(rows.shape[0], generator=rng)[:per_batch]]
        kept[fqn].append(rows.clone())

    stream_blocks(model, fqns, batches, record, n_batches, "calibrate: collect inputs", progress)
    return {f: torch.cat(rows)[:max_tokens] for f, rows in kept.items()}


def kmeans(rows: torch.Tensor, k: int, seed: int, n_init: int) -> torch.Tensor:
    """K-means centres [k, d] of ``rows`` [n, d] (scikit-learn; mini-batch above KMEANS_FULL_LIMIT rows)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n = rows.shape[0]
    if k > n:
        raise TmlpError(f"k = {k} expansion points but only {n} input tokens were collected; lower --k or "
                        "calibrate on more data")
    x = rows.float().numpy()
    if n > KMEANS_FULL_LIMIT:
        km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=n_init, batch_size=4096)
    else:
        km = KMeans(n_clusters=k, random_state=seed, n_init=n_init)
    km.fit(x)
    return torch.from_numpy(km.cluster_centers_).float()


def partition_kmeans(rows: torch.Tensor, k: int, seed: int, n_init: int, projection: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Input-space centres [k, d_in] of K-means on the rows [n, d_in] in the partition's coordinates x·``projection``
    (tmlp.taylor.partition)."""
    return centres_from_projected(kmeans(project(rows, projection), k, seed, n_init), rows, projection)


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def calibrate(model: nn.Module, fqns: list[str], batches: Callable[[], Iterable[torch.Tensor]], n_batches: int,
              config: TaylorConfig, key: dict | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None) -> dict[str, BlockCalibration]:
    """Centres and per-centre tensors for each block in ``fqns``.

    ``batches()`` yields model inputs [B, C, H, W]. With ``key`` (a dict naming the model weights and data), the
    result is cached in ``cache_path('calibration', 'calib-<hash>.pt')`` and reused when every input is the same.
    """
    return calibrate_many(model, fqns, batches, n_batches, [config], key, progress, log)[0]


def calibrate_many(model: nn.Module, fqns: list[str], batches: Callable[[], Iterable[torch.Tensor]], n_batches: int,
                   configs: list[TaylorConfig], key: dict | None = None, progress: bool = True,
                   log: Callable[[str], None] | None = None) -> list[dict[str, BlockCalibration]]:
    """``calibrate`` for several configs (the planner's k values) with shared passes over the data: one collection
    per (max_tokens, seed) and one least-squares pass for all of them. Each result is what ``calibrate`` alone gives
    (same rows, same sums) and is cached under the same key."""
    for config in configs:
        if config.order == 2 and config.hessian == "full":  # refuse before streaming any data
            layers = [m.weight for m in get_module(model, fqns[0]).modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
            raise refuse_full_hessian(config.k, layers[-1].shape[0], layers[0].shape[1])
    for f in fqns:
        get_module(model, f)
    paths = [None if key is None else cache_path("calibration", "calib-" + cache_key(
        {"key": key, "fqns": fqns, "config": c.to_dict(), "n_batches": n_batches}) + ".pt") for c in configs]
    results: list[dict[str, BlockCalibration] | None] = [_cached(path, log) for path in paths]
    todo = [i for i, r in enumerate(results) if r is None]
    inputs: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for i in todo:
        config = configs[i]
        sample = (config.max_tokens, config.seed)
        if sample not in inputs:
            inputs[sample] = collect_inputs(model, fqns, batches(), n_batches, config.max_tokens, config.seed,
                                            progress)
        results[i] = {fqn: centres_and_tensors(block_rows(model, fqn), fqn, inputs[sample][fqn], config)
                      for fqn in tqdm(fqns, desc=f"calibrate: K-means k={config.k} + order-{config.order} tensors",
                                      disable=not progress, leave=False)}
    fitting = [i for i in todo if configs[i].fit == "lstsq"]
    if fitting:
        fitted = fit_least_squares_many(
            model, [{f: (r.centres, r.derivatives) for f, r in results[i].items()} for i in fitting], batches(),
            n_batches, [(configs[i].order, configs[i].fit_ridge) for i in fitting], progress, log,
            [{f: r.projection for f, r in results[i].items()} for i in fitting])
        for i, tensors in zip(fitting, fitted):
            results[i] = {f: replace(r, derivatives=tensors[f]) for f, r in results[i].items()}
    for i in todo:
        if paths[i] is not None:
            save_torch({f: r.to_dict() for f, r in results[i].items()}, paths[i])
    return results


def _cached(path: str | None, log: Callable[[str], None] | None) -> dict[str, BlockCalibration] | None:
    """The calibration stored at ``path``, or None (no key, not cached, or a damaged entry, which is removed)."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a damaged cache entry is recomputed, never trusted
        os.unlink(path)
        return None
    if log:
        log(f"calibration cache hit: {path}")
    return {f: BlockCalibration.from_dict(f, s) for f, s in stored.items()}


def centres_and_tensors(block: nn.Module, fqn: str, rows: torch.Tensor, config: TaylorConfig) -> BlockCalibration:
    """K-means centres of one block's sampled input ``rows`` [n, d_in] and the per-centre tensors at them."""
    projection = partition_projection(block, config.partition, rows, config.partition_rank)
    centres = partition_kmeans(rows, config.k, config.seed, config.n_init, projection)
    if config.basis == "shared":
        derivs = shared_block(block, rows, centres, config, projection=projection)
    else:
        derivs = block_derivatives(block, centres, config.order, config.hessian)
    return BlockCalibration(fqn, centres, derivs, int(rows.shape[0]), projection)


def fit_least_squares(model: nn.Module, blocks: dict[str, tuple[torch.Tensor, SharedDerivatives]],
                      batches: Iterable[torch.Tensor], n_batches: int, order: int, ridge: float = 1e-2,
                      progress: bool = True, log: Callable[[str], None] | None = None,
                      projections: dict[str, torch.Tensor | None] | None = None) -> dict[str, SharedDerivatives]:
    """Refit the per-centre tensors of each block ``{fqn: (centres [k, d_in], Taylor derivatives)}`` of ``model``
    (the original, unmodified) to the block's outputs over ``batches`` (model inputs); one pass over the data.
    ``projections`` {fqn: P or None} gives each block's partition (tmlp.taylor.partition; default Euclidean in x)."""
    return fit_least_squares_many(model, [blocks], batches, n_batches, [(order, ridge)], progress, log,
                                  [projections or {}])[0]


@torch.no_grad()
def fit_least_squares_many(model: nn.Module, groups: list[dict[str, tuple[torch.Tensor, SharedDerivatives]]],
                           batches: Iterable[torch.Tensor], n_batches: int, fits: list[tuple[int, float]],
                           progress: bool = True, log: Callable[[str], None] | None = None,
                           projections: list[dict[str, torch.Tensor | None]] | None = None
                           ) -> list[dict[str, SharedDerivatives]]:
    """``fit_least_squares`` for several groups of blocks, each with its (order, ridge) in ``fits``, in one pass."""
    sums: list[dict[str, CellSums]] = []
    prepared = []
    for g, (blocks, (order, _ridge)) in enumerate(zip(groups, fits)):
        sums.append({})
        prepared.append({})
        for fqn, (centres, d) in blocks.items():
            if not isinstance(d, SharedDerivatives):
                raise TmlpError("--fit lstsq fits shared-basis blocks; use --basis shared, or --fit taylor with "
                                "dense Jacobians")
            if order == 2 and d.t is None:
                raise TmlpError("--fit lstsq at order 2 needs second derivatives; calibrate with --order 2")
            sums[g][fqn] = CellSums.for_block(d, order)
            prepared[g][fqn] = (centres.float(), d.u.float(), d.v.float(), (projections or [{}] * len(groups))[g]
                                .get(fqn))

    def record(fqn: str, x: torch.Tensor, y: torch.Tensor) -> None:
        for g, (order, _ridge) in enumerate(fits):
            if fqn in prepared[g]:
                centres, u, v, projection = prepared[g][fqn]
                accumulate_(sums[g][fqn], x, y, centres, u, v, order, projection=projection)

    fqns = list(dict.fromkeys(f for blocks in groups for f in blocks))
    stream_blocks(model, fqns, batches, record, n_batches, "calibrate: least-squares fit", progress)
    results = []
    for g, (blocks, (_order, ridge)) in enumerate(zip(groups, fits)):
        results.append({})
        for fqn, (_centres, d) in blocks.items():
            results[g][fqn], kept = solve_cells(sums[g][fqn], d, ridge)
            if kept and log:
                log(f"  {fqn}: {kept} of {len(sums[g][fqn].n)} cells had too few (or only identical) tokens to fit and keep their "
                    "Taylor values")
    return results


@torch.no_grad()
def shared_block(block: nn.Module, rows: torch.Tensor, centres: torch.Tensor, config: TaylorConfig,
                 chunk: int = 4096, projection: torch.Tensor | None = None) -> SharedDerivatives:
    """Choose U, V for ``block`` (config.basis_source) from its sampled input ``rows`` [n, d_in] and ``centres``
    (cells in x·``projection``, tmlp.taylor.partition), then project the per-centre derivatives on them."""
    block = block.eval()
    assign = nearest_centre(rows, centres, projection, chunk)
    centre_values = block(centres)
    d_in, d_out = rows.shape[1], centre_values.shape[1]
    # no --rank-out: each side takes --rank directions, or all of them where the block is narrower (a classifier
    # head's d_out, MLP-Mixer's token MLP's d_in at a small input); an explicit --rank-out keeps both ranks exact
    rank, rank_out = ((config.rank, config.rank_out) if config.rank_out is not None
                      else (min(config.rank, d_in), min(config.rank, d_out)))
    check_rank(rank, d_in, d_out, rank_out)
    if config.basis_source == "data":
        outputs = torch.cat([block(rows[s:s + chunk]) for s in range(0, len(rows), chunk)])
        u, v = data_basis(rows, outputs, centres, centre_values, assign, rank, rank_out)
    else:
        weights = torch.bincount(assign, minlength=len(centres)).float() / len(rows)
        u, v = jacobian_basis(*jacobian_grams(block, centres, weights), rank, rank_out)
    return shared_derivatives(block, centres, config.order, u, v)


def nearest_centre_bruteforce(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Reference argmin_i ||x - C_i|| for rows x [N, d] (tests)."""
    d = ((x[:, None, :].astype(np.float64) - centres[None].astype(np.float64)) ** 2).sum(-1)
    return d.argmin(1)
