"""Least-squares fit of the shared-basis per-centre tensors (--fit lstsq): optimality, streaming = batch, export."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from timm.layers import Mlp

from tmlp.calibration.calibrate import calibrate, kmeans, shared_block
from tmlp.errors import TmlpError
from tmlp.export.onnx_export import export_onnx
from tmlp.calibration.calibrate import fit_least_squares
from tmlp.taylor.fit import CellSums, accumulate_, cell_features, solve_cells
from tmlp.surgery import taylorize_
from tmlp.taylor import SharedTaylorMLP, TaylorConfig


def _block_and_tokens(order, d=12, h=48, n=4000, k=6, rank=5, seed=0, rank_out=None):
    torch.manual_seed(seed)
    block = Mlp(d, h).eval()
    rows = torch.randn(n, d) * 2.0
    centres = kmeans(rows, k, seed=0, n_init=1)
    taylor = shared_block(block, rows, centres, TaylorConfig(k=k, order=order, basis="shared", rank=rank,
                                                             rank_out=rank_out, partition_rank=None))
    with torch.no_grad():
        y = block(rows)
    return block, rows, y, centres, taylor


def _sums(rows, y, centres, d, order, chunk=2048):
    sums = CellSums.for_block(d, order)
    accumulate_(sums, rows, y, centres, d.u, d.v, order, chunk=chunk)
    return sums


def _mse(module, x, y):
    with torch.no_grad():
        return float(((module(x) - y) ** 2).mean())


@pytest.mark.parametrize("order", [1, 2])
def test_lstsq_beats_taylor_on_the_tokens_it_was_fitted_on(order):
    """Ridge 0: the fit is the least-squares optimum of the same model family, so it cannot lose to the Taylor
    tensors on its own tokens; on held-out tokens of the same distribution it still wins."""
    block, rows, y, centres, taylor = _block_and_tokens(order)
    fitted, kept = solve_cells(_sums(rows, y, centres, taylor, order), taylor, ridge=0.0)
    assert kept == 0
    t_mod, f_mod = SharedTaylorMLP(centres, taylor, order), SharedTaylorMLP(centres, fitted, order)
    assert _mse(f_mod, rows, y) <= _mse(t_mod, rows, y) * (1 + 1e-6)
    held_out = torch.randn(2000, rows.shape[1]) * 2.0
    with torch.no_grad():
        ref = block(held_out)
    assert _mse(f_mod, held_out, ref) < _mse(t_mod, held_out, ref)


@pytest.mark.parametrize("order", [1, 2])
def test_fitted_residual_satisfies_the_normal_equations(order):
    """Per cell, the residual has zero mean and is orthogonal (in the U coordinates) to the features."""
    block, rows, y, centres, taylor = _block_and_tokens(order)
    fitted, _ = solve_cells(_sums(rows, y, centres, taylor, order), taylor, ridge=0.0)
    with torch.no_grad():
        resid = (y - SharedTaylorMLP(centres, fitted, order)(rows)).double()
    c, f = cell_features(rows, centres, taylor.v, order)
    for cell in range(len(centres)):
        m = c == cell
        scale = float(y[m].double().norm() * f[m].double().norm())
        assert float(resid[m].sum(0).norm()) < 1e-4 * float(y[m].double().norm()) * m.sum() ** 0.5
        assert float((resid[m].T @ f[m].double()).T.matmul(taylor.u.double()).norm()) < 1e-5 * scale


@pytest.mark.parametrize("order", [1, 2])
def test_more_output_directions_fit_the_tokens_better(order):
    """rank_out > rank: the fitted family contains the rank_out = rank one (U's leading columns are the same), so the
    ridge-free fit's own-token error can only fall; S_c (and T_c) are [rank_out, rank]."""
    mse = {}
    for rank_out in (None, 10):
        block, rows, y, centres, taylor = _block_and_tokens(order, rank=3, rank_out=rank_out)
        fitted, kept = solve_cells(_sums(rows, y, centres, taylor, order), taylor, ridge=0.0)
        assert kept == 0 and fitted.s.shape == (6, rank_out or 3, 3)
        if order == 2:
            assert fitted.t.shape == fitted.s.shape
        mse[rank_out] = _mse(SharedTaylorMLP(centres, fitted, order), rows, y)
    assert mse[10] < mse[None]


def test_streamed_sums_do_not_depend_on_chunking():
    _, rows, y, centres, taylor = _block_and_tokens(1)
    a, b = _sums(rows, y, centres, taylor, 1, chunk=4096), _sums(rows, y, centres, taylor, 1, chunk=333)
    # the features are float32 matmuls whose rounding depends on the chunk's size on some BLAS builds (seen on an
    # AMD EPYC): sums of ~650 of them agree to float32 precision, not float64's
    for name in ("n", "f", "y", "ff", "uyf"):
        a_, b_ = getattr(a, name), getattr(b, name)
        assert torch.allclose(a_, b_, rtol=1e-5, atol=1e-5 * float(a_.abs().max())), name


def test_large_ridge_returns_the_taylor_slopes():
    _, rows, y, centres, taylor = _block_and_tokens(1)
    fitted, _ = solve_cells(_sums(rows, y, centres, taylor, 1), taylor, ridge=1e9)
    assert torch.allclose(fitted.s, taylor.s, atol=1e-5)


def test_cells_with_too_few_tokens_keep_their_taylor_values():
    _, rows, y, centres, taylor = _block_and_tokens(1)
    few = rows[:3]  # at most 3 tokens per cell < rank + 2
    fitted, kept = solve_cells(_sums(few, y[:3], centres, taylor, 1), taylor, ridge=0.0)
    assert kept == len(centres)
    assert torch.equal(fitted.s, taylor.s) and torch.equal(fitted.value, taylor.value)


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_a_cell_whose_tokens_all_coincide_keeps_its_taylor_values(ridge):
    """Tokens that do not vary (a constant position) make the cell's system singular: that cell keeps its Taylor
    tensors instead of failing the export, and the other cells are fitted."""
    _, rows, y, centres, taylor = _block_and_tokens(1)
    c = int(cell_features(rows[:1], centres, taylor.v, 1)[0][0])
    same = rows[:1].repeat(50, 1)
    x = torch.cat([same, rows[1:]])
    yy = torch.cat([y[:1].repeat(50, 1), y[1:]])
    mine = cell_features(x, centres, taylor.v, 1)[0] == c
    x, yy = torch.cat([same, x[~mine]]), torch.cat([y[:1].repeat(50, 1), yy[~mine]])
    fitted, kept = solve_cells(_sums(x, yy, centres, taylor, 1), taylor, ridge=ridge)
    assert kept == 1 and torch.equal(fitted.s[c], taylor.s[c])
    assert not torch.equal(fitted.s, taylor.s)


def test_fit_through_model_hooks_equals_the_fit_on_collected_tokens(tiny_vit, digit_batches):
    """The streaming pass (forward hooks over calibration batches) sees exactly the block's inputs and outputs."""
    fqn = "blocks.2.mlp"
    cal = calibrate(tiny_vit, [fqn], lambda: iter(digit_batches), len(digit_batches),
                    TaylorConfig(k=8, basis="shared", rank=8), progress=False)[fqn]
    fitted = fit_least_squares(tiny_vit, {fqn: (cal.centres, cal.derivatives)}, iter(digit_batches),
                               len(digit_batches), order=1, progress=False)[fqn]
    xs = []
    handle = tiny_vit.get_submodule(fqn).register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for x in digit_batches:
            tiny_vit(x)
    handle.remove()
    rows = torch.cat(xs)
    with torch.no_grad():
        y = tiny_vit.get_submodule(fqn)(rows)
    direct, _ = solve_cells(_sums(rows, y, cal.centres, cal.derivatives, 1), cal.derivatives, ridge=1e-2)
    assert torch.allclose(fitted.s, direct.s, atol=1e-4) and torch.allclose(fitted.value, direct.value, atol=1e-4)


def test_calibrate_with_lstsq_lowers_the_model_error_and_exports_with_parity(trained_tiny_vit, digit_batches,
                                                                          tmp_path):
    batches = lambda: iter(digit_batches)  # noqa: E731
    fqns = [f"blocks.{i}.mlp" for i in range(6)]
    errs = {}
    for fit in ("taylor", "lstsq"):
        model = __import__("copy").deepcopy(trained_tiny_vit)
        taylorize_(model, TaylorConfig(k=8, basis="shared", rank=16, fit=fit), layers=fqns, batches=batches,
                   n_batches=len(digit_batches), progress=False)
        with torch.no_grad():
            x = digit_batches[0]
            errs[fit] = float((model(x) - trained_tiny_vit(x)).norm() / trained_tiny_vit(x).norm())
        if fit == "lstsq":
            path = str(tmp_path / "lstsq.onnx")
            export_onnx(model, x[:2], path, {})
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
            with torch.no_grad():
                np.testing.assert_allclose(got, model(x).numpy(), atol=2e-4, rtol=1e-3)
    assert errs["lstsq"] < errs["taylor"]


def test_lstsq_with_dense_jacobians_is_refused():
    with pytest.raises(TmlpError, match="--fit lstsq fits shared-basis blocks"):
        TaylorConfig(k=4, basis="dense", fit="lstsq")
    with pytest.raises(TmlpError, match="fit must be"):
        TaylorConfig(k=4, basis="shared", fit="secant")
