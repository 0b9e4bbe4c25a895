"""Closed-form Jacobians/Hessian diagonals against torch.func, and the refusal of a full Hessian."""
import pytest
import torch
from timm.layers import Mlp
from torch.func import jacrev, vmap

from tmlp.taylor.derivatives import block_derivatives, func_derivatives, gelu_derivatives, mlp_derivatives
from tmlp.errors import TmlpError
from tmlp.models import VGGHead


def _mlp(d=12, h=48, seed=0):
    torch.manual_seed(seed)
    return Mlp(d, h).eval()


def test_gelu_derivatives_match_autograd():
    z = torch.linspace(-6, 6, 101, dtype=torch.float64)
    d1, d2 = gelu_derivatives(z)
    f = lambda t: torch.nn.functional.gelu(t)  # noqa: E731
    g1 = vmap(torch.func.grad(f))(z)
    g2 = vmap(torch.func.grad(torch.func.grad(f)))(z)
    assert torch.allclose(d1, g1, atol=1e-12) and torch.allclose(d2, g2, atol=1e-12)


def test_mlp_jacobian_closed_form_matches_jacrev():
    block = _mlp()
    centres = torch.randn(7, 12)
    closed = mlp_derivatives(block, centres, order=1)
    reference = vmap(jacrev(lambda x: block(x[None])[0]))(centres)
    assert closed.jacobian.shape == (7, 12, 12)
    assert torch.allclose(closed.jacobian, reference, atol=1e-5)
    assert torch.allclose(closed.value, block(centres), atol=1e-6)


def test_mlp_hessian_diagonal_closed_form_matches_torch_func():
    block = _mlp(d=6, h=20)
    centres = torch.randn(3, 6)
    closed = mlp_derivatives(block, centres, order=2)
    generic = func_derivatives(block, centres, order=2)
    full = vmap(torch.func.hessian(lambda x: block(x[None])[0]))(centres)  # [k, d_out, d_in, d_in]
    diag = torch.diagonal(full, dim1=-2, dim2=-1)
    assert torch.allclose(closed.hessian_diag, diag, atol=1e-5)
    assert torch.allclose(generic.hessian_diag, diag, atol=1e-5)


def test_generic_path_for_vgg_head_matches_jacrev():
    torch.manual_seed(0)
    head = VGGHead(16, 32, 10).eval()
    centres = torch.randn(5, 16)
    d = block_derivatives(head, centres, order=1)
    reference = vmap(jacrev(lambda x: head(x[None])[0]))(centres)
    assert d.jacobian.shape == (5, 10, 16)
    assert torch.allclose(d.jacobian, reference, atol=1e-6)


def test_full_hessian_is_refused_with_its_storage_figure():
    with pytest.raises(TmlpError, match=r"full Hessian needs .*100\*768\*768\^2 .* = 181 GB"):
        block_derivatives(Mlp(768, 3072).eval(), torch.randn(100, 768), order=2, hessian="full")
