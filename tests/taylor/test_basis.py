"""Shared-basis Taylor blocks (J_c ≈ U S_c Vᵀ): exact at full rank, closed form = torch.func, ONNX parity."""
import pytest
import torch
from timm.layers import Mlp
from torch import nn

from tmlp.calibration.calibrate import kmeans, shared_block
from tmlp.taylor.derivatives import block_derivatives, shared_derivatives
from tmlp.errors import TmlpError
from tmlp.export.onnx_export import export_onnx, op_counts
from tmlp.taylor import SharedTaylorMLP, TaylorConfig, TaylorMLP


def _setup(d=16, h=48, n=3000, k=12, seed=0):
    torch.manual_seed(seed)
    block = Mlp(d, h).eval()
    rows = torch.randn(n, d) * 1.5
    centres = kmeans(rows, k, seed=0, n_init=1)
    return block, rows, centres


@pytest.mark.parametrize("source", ["data", "jacobian"])
def test_full_rank_shared_equals_dense_at_first_order(source):
    block, rows, centres = _setup()
    shared = SharedTaylorMLP(centres, shared_block(block, rows, centres, TaylorConfig(
        k=12, basis="shared", rank=16, basis_source=source)), order=1)
    dense = TaylorMLP(centres, block_derivatives(block, centres, 1), order=1)
    x = torch.randn(500, 16)
    with torch.no_grad():
        assert torch.allclose(shared(x), dense(x), atol=1e-4)


def test_low_rank_is_exact_when_the_jacobians_have_that_rank():
    torch.manual_seed(0)
    block = nn.Linear(12, 10).eval()
    with torch.no_grad():
        block.weight.copy_(torch.randn(10, 3) @ torch.randn(3, 12))  # rank 3
    rows = torch.randn(2000, 12)
    centres = kmeans(rows, 5, seed=0, n_init=1)
    cfg = TaylorConfig(k=5, basis="shared", rank=3, basis_source="jacobian")
    shared = SharedTaylorMLP(centres, shared_block(block, rows, centres, cfg), order=1)
    x = torch.randn(300, 12) * 3
    with torch.no_grad():
        assert torch.allclose(shared(x), block(x), atol=1e-4)


@pytest.mark.parametrize("order", [1, 2])
def test_closed_form_projection_matches_torch_func(order):
    block, rows, centres = _setup(d=8, h=24, k=4)
    u = torch.linalg.qr(torch.randn(8, 5))[0]  # any orthonormal bases will do
    v = torch.linalg.qr(torch.randn(8, 5))[0]
    closed = shared_derivatives(block, centres, order, u, v)

    class Wrapped(nn.Module):  # same function, not a timm Mlp: takes the generic torch.func path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    generic = shared_derivatives(Wrapped(block), centres, order, u, v)
    assert torch.allclose(closed.s, generic.s, atol=1e-5)
    if order == 2:
        assert torch.allclose(closed.t, generic.t, atol=1e-5)


def test_second_order_reduces_the_error_near_centres():
    block, rows, centres = _setup()
    x = centres[torch.randint(0, 12, (400,))] + 0.3 * torch.randn(400, 16)
    errors = {}
    for order in (1, 2):
        cfg = TaylorConfig(k=12, order=order, basis="shared", rank=16)
        taylor = SharedTaylorMLP(centres, shared_block(block, rows, centres, cfg), order=order)
        with torch.no_grad():
            errors[order] = (taylor(x) - block(x)).norm() / block(x).norm()
    assert errors[2] < errors[1]


def test_full_input_and_output_ranks_equal_dense_when_d_out_exceeds_d_in():
    """rank = d_in and rank_out = d_out > d_in: U and V span everything, so the shared block is the dense one (one
    rank could not exceed min(d_in, d_out) = 8 here)."""
    torch.manual_seed(0)
    block = Mlp(8, 32, out_features=16).eval()
    rows = torch.randn(3000, 8) * 1.5
    centres = kmeans(rows, 6, seed=0, n_init=1)
    derivs = shared_block(block, rows, centres, TaylorConfig(k=6, basis="shared", rank=8, rank_out=16))
    assert derivs.u.shape == (16, 16) and derivs.v.shape == (8, 8) and derivs.s.shape == (6, 16, 8)
    shared = SharedTaylorMLP(centres, derivs, order=1)
    assert (shared.rank, shared.rank_out) == (8, 16) and "rank_out=16" in repr(shared)
    dense = TaylorMLP(centres, block_derivatives(block, centres, 1), order=1)
    x = torch.randn(500, 8)
    with torch.no_grad():
        assert torch.allclose(shared(x), dense(x), atol=1e-4)


@pytest.mark.parametrize("source", ["data", "jacobian"])
def test_more_output_directions_keep_the_input_ones_and_project_the_jacobians_better(source):
    """rank_out > rank: V is the same as at rank_out = rank, U gains columns, and U S_c Vᵀ = U Uᵀ J_c V Vᵀ comes
    closer to each J_c."""
    block, rows, centres = _setup()
    dense = block_derivatives(block, centres, 1).jacobian
    err = {}
    for r_out in (4, 12):
        d = shared_block(block, rows, centres, TaylorConfig(k=12, basis="shared", rank=4, rank_out=r_out,
                                                             basis_source=source))
        err[r_out] = float((d.u @ d.s @ d.v.T - dense).norm())
        if r_out == 4:
            v4 = d.v
    assert torch.allclose(d.v.abs(), v4.abs(), atol=1e-5)
    assert err[12] < err[4]


@pytest.mark.parametrize("order, rank_out", [(1, None), (2, None), (1, 12), (2, 12)])
def test_onnx_graph_and_parity(order, rank_out, tmp_path):
    block, rows, centres = _setup(d=32, h=64, k=10)
    cfg = TaylorConfig(k=10, order=order, basis="shared", rank=8, rank_out=rank_out)
    taylor = SharedTaylorMLP(centres, shared_block(block, rows, centres, cfg), order=order).eval()
    assert taylor.s.shape == (10, rank_out or 8, 8)
    path = str(tmp_path / "shared.onnx")
    x = torch.randn(64, 32)
    ops = export_onnx(taylor, x[:2], path, {})
    assert ops == op_counts(path)
    assert ops["ArgMin"] == 1 and "GatherND" not in ops
    assert ops["Gather"] == (2 if order == 1 else 4)  # S and a; order 2 adds T and VᵀC
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = taylor(x).numpy()
    assert abs(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0] - ref).max() < 1e-4


def test_a_narrow_input_keeps_all_its_directions_when_no_output_rank_is_given():
    """MLP-Mixer's token MLP at 32x32 has d_in = 4 < the default rank 32: V spans all 8 input directions here, and
    U spans all 8 outputs."""
    block, rows, centres = _setup(d=8, h=16, k=4)
    shared = shared_block(block, rows, centres, TaylorConfig(k=4, basis="shared", rank=9))
    assert shared.v.shape == (8, 8) and shared.u.shape == (8, 8) and shared.s.shape == (4, 8, 8)
    assert torch.allclose(shared.v @ shared.v.T, torch.eye(8), atol=1e-5)


def test_a_narrow_output_takes_all_its_directions_when_no_output_rank_is_given():
    """A classifier head (d_out 4 < rank 8): U spans all 4 output directions, S_c is [4, 8]; an explicit
    --rank-out above d_out is still refused (next test)."""
    torch.manual_seed(0)
    block = Mlp(16, 32, out_features=4).eval()
    rows = torch.randn(600, 16)
    centres = kmeans(rows, 4, seed=0, n_init=1)
    shared = shared_block(block, rows, centres, TaylorConfig(k=4, rank=8))
    assert shared.u.shape == (4, 4) and shared.v.shape == (16, 8) and shared.s.shape == (4, 4, 8)


@pytest.mark.parametrize("rank, rank_out, message", [(9, 4, "rank 9 must lie in 1..d_in = 8"),
                                                     (4, 17, "output rank 17 must lie in 1..d_out = 16")])
def test_ranks_beyond_their_sides_are_refused(rank, rank_out, message):
    torch.manual_seed(0)
    block = Mlp(8, 32, out_features=16).eval()
    rows = torch.randn(500, 8)
    centres = kmeans(rows, 4, seed=0, n_init=1)
    with pytest.raises(TmlpError, match=message):
        shared_block(block, rows, centres, TaylorConfig(k=4, basis="shared", rank=rank, rank_out=rank_out))


def test_rank_out_must_be_positive_and_configs_without_it_are_refused():
    with pytest.raises(TmlpError, match="--rank-out must be a positive integer"):
        TaylorConfig(basis="shared", rank_out=0)
    old = TaylorConfig().to_dict()
    del old["_data"]["rank_out"]
    with pytest.raises(TmlpError, match=r"fields \['rank_out'\] missing or unknown: calibrate again"):
        TaylorConfig.from_dict(old)
    assert TaylorConfig.from_dict(TaylorConfig(rank_out=48).to_dict()).rank_out == 48


def test_shared_basis_needs_first_order():
    with pytest.raises(TmlpError, match="shared basis needs order 1 or 2"):
        TaylorConfig(k=4, order=0, basis="shared")
