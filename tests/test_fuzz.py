"""Property-based tests (hypothesis) of the Taylor block: random shapes and centres; nearest-centre assignment equals
brute force; order 1 is exact on affine blocks (dense, and shared at full rank); PyTorch and onnxruntime agree."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tmlp.taylor.derivatives import block_derivatives, shared_derivatives
from tmlp.taylor import SharedTaylorMLP, TaylorMLP, build_taylor_block

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def problems(draw, max_d: int = 12):
    """(seed, k, d_in, d_out, n): a random block problem, generated from a seed for speed."""
    return (draw(st.integers(0, 2**31 - 1)), draw(st.integers(1, 16)), draw(st.integers(1, max_d)),
            draw(st.integers(1, max_d)), draw(st.integers(1, 40)))


def _tensors(seed, k, d_in, n, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d_in, generator=g, dtype=torch.float64) * scale
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) * scale
    return centres.float(), x.float()


@settings(max_examples=150, **SETTINGS)
@given(problems())
def test_assignment_equals_brute_force_nearest_centre(problem):
    seed, k, d_in, d_out, n = problem
    centres, x = _tensors(seed, k, d_in, n)
    dist = torch.cdist(x.double(), centres.double())  # [n, k], exact enough in float64
    if k > 1:
        two = dist.topk(2, largest=False).values
        assume(bool(((two[:, 1] - two[:, 0]) > 1e-3 * (1 + two[:, 0])).all()))  # no near ties
    block = TaylorMLP(centres, block_derivatives(torch.nn.Linear(d_in, d_out), centres, 1), order=1)
    assert torch.equal(block.assign(x), dist.argmin(1))


@settings(max_examples=100, **SETTINGS)
@given(problems(), st.sampled_from(["dense", "shared"]))
def test_order_one_is_exact_on_affine_blocks(problem, basis):
    """F(x) = A x + b: every centre's first-order expansion is F itself, whatever the centres. Shared basis: A of
    rank r, with U and V any orthonormal bases of its column and row spaces (so J = U S Vᵀ holds exactly)."""
    seed, k, d_in, d_out, n = problem
    torch.manual_seed(seed)
    affine = torch.nn.Linear(d_in, d_out).eval()
    centres, x = _tensors(seed, k, d_in, n)
    if basis == "dense":
        block = TaylorMLP(centres, block_derivatives(affine, centres, 1), order=1)
    else:
        r = 1 + seed % min(d_in, d_out)
        left, right = torch.randn(d_out, r, dtype=torch.float64), torch.randn(r, d_in, dtype=torch.float64)
        with torch.no_grad():
            affine.weight.copy_((left @ right).float())
        u = torch.linalg.qr(left)[0].float()  # spans A's columns
        v = torch.linalg.qr(right.T)[0].float()  # spans A's rows
        block = SharedTaylorMLP(centres, shared_derivatives(affine, centres, 1, u, v), order=1)
    with torch.no_grad():
        torch.testing.assert_close(block(x), affine(x), atol=1e-4 * (1 + float(affine(x).abs().max())), rtol=1e-4)


@settings(max_examples=8, **SETTINGS)
@given(problems(max_d=8), st.sampled_from([(1, "dense"), (2, "dense"), (1, "shared"), (2, "shared")]))
def test_pytorch_and_onnxruntime_agree(tmp_path_factory, problem, form):
    """Export one Taylor block of a small GELU MLP (random shapes, centres, order and form) and run it in
    onnxruntime on the same rows."""
    import onnxruntime as ort

    seed, k, d_in, d_out, n = problem
    order, basis = form
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(d_in, 16), torch.nn.GELU(), torch.nn.Linear(16, d_out)).eval()
    centres, x = _tensors(seed, k, d_in, n, scale=1.0)
    if basis == "dense":
        block = build_taylor_block(centres, block_derivatives(mlp, centres, order), order)
    else:
        r = max(1, min(d_in, d_out) // 2)
        u = torch.linalg.qr(torch.randn(d_out, r, dtype=torch.float64))[0].float()
        v = torch.linalg.qr(torch.randn(d_in, r, dtype=torch.float64))[0].float()
        block = build_taylor_block(centres, shared_derivatives(mlp, centres, order, u, v), order)
    block.eval()
    path = str(tmp_path_factory.mktemp("fuzz") / "block.onnx")
    batch = torch.export.Dim("n", min=1, max=4096)
    torch.onnx.export(block, (x,), path, dynamo=True, opset_version=20, dynamic_shapes=({0: batch},),
                      input_names=["x"])
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for rows in (x, x[:1]):
        got = session.run(None, {"x": rows.numpy()})[0]
        with torch.no_grad():
            want = block(rows).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4 * (1 + np.abs(want).max()), rtol=1e-4)


def test_hypothesis_is_configured_deterministically():
    assert SETTINGS["derandomize"] is True  # CI runs the same examples every time
    pytest.importorskip("hypothesis")
