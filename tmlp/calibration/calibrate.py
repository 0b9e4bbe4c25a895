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

from tmlp.taylor.block import build_taylor_block
from tmlp.taylor.exact import ExactUnits, HybridTaylorMLP, WithoutUnits, choose_units
from tmlp.taylor.basis import check_rank, data_basis, jacobian_basis
from tmlp.taylor.derivatives import (BlockDerivatives, SharedDerivatives, block_derivatives, jacobian_grams,
                              refuse_full_hessian, shared_derivatives)
from tmlp.errors import TmlpError
from tmlp.taylor.fit import CellSums, accumulate_, solve_cells
from tmlp.calibration.record import IndexedBatch, block_rows, get_module, stream_blocks
from tmlp.distributed import all_gather_objects, all_reduce_, broadcast_object, world
from tmlp.io import cache_path, save_torch
from tmlp.taylor.partition import (centres_from_projected, nearest_centre, partition_projection,
                            project)
from tmlp.spec import TaylorConfig

KMEANS_FULL_LIMIT = 100_000  # above this many rows, mini-batch K-means
SAMPLE_VERSION = "per-image-1"  # how collect_inputs draws its tokens (part of the cache key)


@dataclass
class BlockCalibration:
    """What calibration produced for one block: centres [k, d_in], the per-centre tensors, the partition's
    projection P [d_in, q] of the nearest-centre assignment (None: Euclidean in x; tmlp.taylor.partition), and the
    hidden units kept exact (``units`` [m] int64, None: none; tmlp.taylor.exact), whose tensors then serve F − E."""

    fqn: str
    centres: torch.Tensor
    derivatives: BlockDerivatives | SharedDerivatives
    n_tokens: int  # rows K-means saw
    projection: torch.Tensor | None = None
    units: torch.Tensor | None = None

    def to_dict(self) -> dict:
        kind = "shared" if isinstance(self.derivatives, SharedDerivatives) else "dense"
        return {"centres": self.centres, "n_tokens": self.n_tokens, "kind": kind,
                "derivatives": asdict(self.derivatives), "projection": self.projection, "units": self.units}

    @classmethod
    def from_dict(cls, fqn: str, d: dict) -> "BlockCalibration":
        kind = SharedDerivatives if d["kind"] == "shared" else BlockDerivatives
        return cls(fqn, d["centres"], kind(**d["derivatives"]), d["n_tokens"], d["projection"], d.get("units"))

    def build(self, order: int, original: nn.Module, channel_dim: int = -1) -> nn.Module:
        """The module that replaces ``original`` (the block this was calibrated on): its Taylor block, plus its
        exact units when it keeps some (tmlp.taylor.exact.HybridTaylorMLP)."""
        block = build_taylor_block(self.centres, self.derivatives, order, self.projection, channel_dim)
        return block if self.units is None else HybridTaylorMLP(block, ExactUnits(original, self.units))


@torch.no_grad()
def collect_inputs(model: nn.Module, fqns: list[str], batches: Iterable[torch.Tensor | IndexedBatch], n_batches: int,
                   max_tokens: int, seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run ``model`` over ``batches`` and keep, for each block in ``fqns``, a sample of at most ``max_tokens`` of its
    input rows; returns {fqn: [n, d_in] float32}.

    Each image contributes ``ceil(max_tokens / images)`` of its rows, chosen by a generator seeded with (``seed``,
    the image's position), and the sample is ordered by image, then row: it is the same whichever process streams
    which image. Under torchrun (``batches`` yielding each rank's share as IndexedBatch) the ranks' samples are
    gathered, so every rank returns the sample one process draws. Plain tensors are numbered in the order they come;
    their stream is taken to hold ``n_batches`` × the first batch's size images."""
    state: dict = {"index": None, "total": None, "picks": {}}
    kept: dict[str, list[tuple[np.ndarray, np.ndarray, torch.Tensor]]] = {f: [] for f in fqns}

    def numbered():
        start = 0
        for item in batches:
            if isinstance(item, IndexedBatch):
                state.update(index=item.index, total=item.total)
            else:
                state.update(index=np.arange(start, start + len(item)),
                             total=state["total"] or max(1, n_batches * len(item)))
                start += len(item)
            state["picks"] = {}
            yield item

    def record(fqn: str, x: torch.Tensor, y: torch.Tensor) -> None:
        index = state["index"]
        if not torch.isfinite(x).all():
            raise TmlpError(f"block {fqn} received NaN or Inf activations; check the checkpoint and the "
                            "input preprocessing")
        per_image = x.shape[0] // len(index)
        if per_image * len(index) != x.shape[0]:
            raise TmlpError(f"block {fqn} sees {x.shape[0]} rows for {len(index)} images; calibration needs the same "
                            "number of rows per image")
        if per_image not in state["picks"]:
            state["picks"][per_image] = image_rows(index, per_image, math.ceil(max_tokens / state["total"]), seed)
        image, row = state["picks"][per_image]
        kept[fqn].append((index[image], row, x[torch.from_numpy(image * per_image + row)].float().clone()))

    stream_blocks(model, fqns, numbered(), record, n_batches, "calibrate: collect inputs", progress)
    return {f: _ordered_sample(parts, max_tokens) for f, parts in kept.items()}


def image_rows(index: np.ndarray, rows_per_image: int, take: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image [m], row [m]): for each image of a batch (its stream positions ``index`` [B]), ``take`` of its
    ``rows_per_image`` rows (all if fewer), drawn by a generator seeded with (``seed``, position), rows ascending;
    ``image`` gives each pick's place in the batch."""
    if rows_per_image <= take:
        picks = [np.arange(rows_per_image)] * len(index)
    else:
        picks = [np.sort(np.random.default_rng([seed, int(i)]).choice(rows_per_image, take, replace=False))
                 for i in index]
    image = np.repeat(np.arange(len(index)), [len(p) for p in picks])
    return image, np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)


def _ordered_sample(parts: list[tuple[np.ndarray, np.ndarray, torch.Tensor]], max_tokens: int) -> torch.Tensor:
    """All ranks' picks (stream position, row, values) of one block, ordered by image then row, first
    ``max_tokens``."""
    gathered = [p for rank_parts in all_gather_objects(parts) for p in rank_parts]
    if not gathered:
        raise TmlpError("no calibration images reached the blocks; calibrate on more images")
    image = np.concatenate([p[0] for p in gathered]).astype(np.int64)
    row = np.concatenate([p[1] for p in gathered]).astype(np.int64)
    # np.unique sorts by (image, row) and keeps one copy of a pick two ranks both made
    _, first = np.unique(image * (int(row.max()) + 1) + row, return_index=True)
    return torch.cat([p[2] for p in gathered])[torch.from_numpy(first[:max_tokens])]


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
    w = world()
    progress = progress and w.main
    paths = [None if key is None else cache_path("calibration", "calib-" + cache_key(
        {"key": key, "fqns": fqns, "config": c.to_dict(), "n_batches": n_batches, "sample": SAMPLE_VERSION}) + ".pt")
        for c in configs]
    # rank 0 reads the cache and hands what it found to the others (their disks may not hold it)
    results: list[dict[str, BlockCalibration] | None] = broadcast_object(
        [_cached(path, log) for path in paths] if w.main else None)
    todo = [i for i, r in enumerate(results) if r is None]
    inputs: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    cells: dict[tuple[str, str], tuple[torch.Tensor | None, torch.Tensor]] = {}  # configs differing in units share
    for i in todo:
        config = configs[i]
        sample = (config.max_tokens, config.seed)
        if sample not in inputs:
            inputs[sample] = collect_inputs(model, fqns, batches(), n_batches, config.max_tokens, config.seed,
                                            progress)
        results[i] = split_over_ranks(
            fqns, lambda fqn: centres_and_tensors(block_rows(model, fqn), fqn, inputs[sample][fqn], config, cells),
            f"calibrate: K-means k={config.k} + order-{config.order} tensors", progress)
    fitting = [i for i in todo if configs[i].fit == "lstsq"]
    if fitting:
        fitted = fit_least_squares_many(
            model, [{f: (r.centres, r.derivatives) for f, r in results[i].items()} for i in fitting], batches(),
            n_batches, [(configs[i].order, configs[i].fit_ridge) for i in fitting], progress, log,
            [{f: r.projection for f, r in results[i].items()} for i in fitting],
            [{f: r.units for f, r in results[i].items()} for i in fitting])
        for i, tensors in zip(fitting, fitted):
            results[i] = {f: replace(r, derivatives=tensors[f]) for f, r in results[i].items()}
    for i in todo:
        if paths[i] is not None and w.main:
            save_torch({f: r.to_dict() for f, r in results[i].items()}, paths[i])
    return results


def split_over_ranks(fqns: list[str], compute: Callable[[str], BlockCalibration], desc: str, progress: bool
                     ) -> dict[str, BlockCalibration]:
    """{fqn: compute(fqn)}, under torchrun with the blocks dealt out over the ranks (block j on rank j mod N) and the
    results gathered, so every rank holds them all."""
    w = world()
    mine = fqns[w.rank::w.size]
    done = {f: compute(f) for f in tqdm(mine, desc=desc, disable=not progress, leave=False)}
    merged = {f: r for part in all_gather_objects(done) for f, r in part.items()}
    return {f: merged[f] for f in fqns}


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


def centres_and_tensors(block: nn.Module, fqn: str, rows: torch.Tensor, config: TaylorConfig,
                        cells: dict[tuple[str, str], tuple[torch.Tensor | None, torch.Tensor]] | None = None
                        ) -> BlockCalibration:
    """K-means centres of one block's sampled input ``rows`` [n, d_in] and the per-centre tensors at them.
    ``cells``, if given, memoises (projection, centres) per block and config up to its exact units, so that the
    planner's unit counts share one K-means (the rows must be the same for every config sharing it)."""
    key = (fqn, json.dumps(config.replace(exact_units=0).to_dict(), sort_keys=True))
    if cells is not None and key in cells:
        projection, centres = cells[key]
    else:
        projection = partition_projection(block, config.partition, rows, config.partition_rank)
        centres = partition_kmeans(rows, config.k, config.seed, config.n_init, projection)
        if cells is not None:
            cells[key] = projection, centres
    units, served = None, block
    if config.exact_units:
        units = choose_units(block, rows, nearest_centre(rows, centres, projection), config.k, config.exact_units)
        served = WithoutUnits(block, ExactUnits(block, units)).eval()
    if config.basis == "shared":
        derivs = shared_block(served, rows, centres, config, projection=projection)
    else:
        derivs = block_derivatives(served, centres, config.order, config.hessian)
    return BlockCalibration(fqn, centres, derivs, int(rows.shape[0]), projection, units)


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
                           projections: list[dict[str, torch.Tensor | None]] | None = None,
                           units: list[dict[str, torch.Tensor | None]] | None = None
                           ) -> list[dict[str, SharedDerivatives]]:
    """``fit_least_squares`` for several groups of blocks, each with its (order, ridge) in ``fits``, in one pass.
    ``units`` {fqn: exact hidden units or None} per group: those blocks' tensors are fitted to F − E
    (tmlp.taylor.exact)."""
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
            kept = (units or [{}] * len(groups))[g].get(fqn)
            exact = None if kept is None else ExactUnits(get_module(model, fqn), kept).eval()
            prepared[g][fqn] = (centres.float(), d.u.float(), d.v.float(), (projections or [{}] * len(groups))[g]
                                .get(fqn), exact)

    def record(fqn: str, x: torch.Tensor, y: torch.Tensor) -> None:
        for g, (order, _ridge) in enumerate(fits):
            if fqn in prepared[g]:
                centres, u, v, projection, exact = prepared[g][fqn]
                target = y if exact is None else y - exact(x)
                accumulate_(sums[g][fqn], x, target, centres, u, v, order, projection=projection)

    fqns = list(dict.fromkeys(f for blocks in groups for f in blocks))
    stream_blocks(model, fqns, batches, record, n_batches, "calibrate: least-squares fit", progress)
    for group_sums in sums:  # under torchrun each rank summed its share of the images
        for cell in group_sums.values():
            all_reduce_([cell.n, cell.f, cell.y, cell.ff, cell.uyf])
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
