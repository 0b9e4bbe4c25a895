"""Values, Jacobians and diagonal Hessians of a block at its expansion points.

For a timm ``Mlp`` (fc1 -> act -> fc2 with Linear layers, no hidden norm, an elementwise activation) the closed
forms are used::

    z = W1 x0 + b1,   J(x0) = W2 diag(act'(z)) W1,   H_diag(x0)[o, j] = sum_h W2[o, h] act''(z_h) W1[h, j]^2

(act' and act'' in closed form for the exact GELU, by autograd of the scalar function for the others: ReLU, SiLU,
tanh-GELU, ...)
and any other block goes through ``torch.func`` (``jacrev`` for J, forward-over-forward ``jvp`` along each input
axis for the Hessian diagonal). A full Hessian (k * d_out * d_in^2 numbers) is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tmlp.errors import TmlpError

SQRT_HALF = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass
class BlockDerivatives:
    """Per-centre tensors: ``value`` F(C) [k, d_out], ``jacobian`` [k, d_out, d_in] (order >= 1),
    ``hessian_diag`` [k, d_out, d_in] (order 2)."""

    value: torch.Tensor
    jacobian: torch.Tensor | None = None
    hessian_diag: torch.Tensor | None = None


def full_hessian_bytes(k: int, d_out: int, d_in: int, bytes_per: int = 4) -> int:
    """Storage of k full Hessians of a R^d_in -> R^d_out block, in bytes."""
    return k * d_out * d_in * d_in * bytes_per


def refuse_full_hessian(k: int, d_out: int, d_in: int) -> TmlpError:
    size = full_hessian_bytes(k, d_out, d_in)
    return TmlpError(f"a full Hessian needs k*d_out*d_in^2 = {k}*{d_out}*{d_in}^2 floats = {_human(size)} per "
                     "block; use the diagonal second order (--order 2 --hessian diag) instead")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} EB"


def gelu_derivatives(z: torch.Tensor, approximate: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu'(z), gelu''(z)) of the exact (erf) GELU; ``approximate='tanh'`` uses autograd of the tanh form."""
    if approximate == "none":
        pdf = torch.exp(-0.5 * z * z) * INV_SQRT_2PI
        cdf = 0.5 * (1.0 + torch.erf(z * SQRT_HALF))
        return cdf + z * pdf, pdf * (2.0 - z * z)
    return _autograd_derivatives(lambda t: nn.functional.gelu(t, approximate=approximate), z)


def activation_derivatives(act: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(act'(z), act''(z)) of an elementwise activation module at pre-activations z."""
    if isinstance(act, nn.GELU):
        return gelu_derivatives(z, act.approximate)
    return _autograd_derivatives(act, z)


def is_elementwise(act: nn.Module) -> bool:
    """An activation that maps each number alone (torch's and timm's pointwise activations)."""
    return isinstance(act, ELEMENTWISE) or type(act).__module__ == "timm.layers.activations"


ELEMENTWISE = (nn.GELU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardswish,
               nn.Hardsigmoid, nn.Softplus)


def _autograd_derivatives(fn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        (d1,) = torch.autograd.grad(fn(z * 1.0).sum(), z, create_graph=True)  # * 1.0: in-place activations
        if not d1.requires_grad:  # piecewise linear (ReLU): no second derivative
            return d1.detach(), torch.zeros_like(z)
        (d2,) = torch.autograd.grad(d1.sum(), z)
    return d1.detach(), d2.detach()


def is_closed_form_mlp(block: nn.Module) -> bool:
    """A timm Mlp whose forward is exactly fc2(act(fc1(x))) in eval mode (Linear layers, identity norm, an
    elementwise activation)."""
    try:
        from timm.layers import Mlp
    except ImportError:
        return False
    return (type(block) is Mlp and isinstance(block.fc1, nn.Linear) and isinstance(block.fc2, nn.Linear)
            and is_elementwise(block.act) and isinstance(block.norm, nn.Identity))


@torch.no_grad()
def mlp_derivatives(block: nn.Module, centres: torch.Tensor, order: int, chunk: int = 32) -> BlockDerivatives:
    """Closed-form F, J and H_diag of a timm ``Mlp`` at ``centres`` [k, d_in]."""
    w1, b1 = block.fc1.weight.double(), block.fc1.bias.double() if block.fc1.bias is not None else 0.0
    w2 = block.fc2.weight.double()
    c64 = centres.double()
    z = c64 @ w1.T + b1  # [k, hidden]
    value = block(centres.float()).double()
    out = BlockDerivatives(value=value.float())
    if order == 0:
        return out
    d1, d2 = activation_derivatives(block.act, z)
    jac, hess = [], []
    for s in range(0, len(centres), chunk):
        jac.append(torch.einsum("oh,kh,hi->koi", w2, d1[s:s + chunk], w1).float())
        if order == 2:
            hess.append(torch.einsum("oh,kh,hi->koi", w2, d2[s:s + chunk], w1 * w1).float())
    out.jacobian = torch.cat(jac)
    if order == 2:
        out.hessian_diag = torch.cat(hess)
    return out


def func_derivatives(block: nn.Module, centres: torch.Tensor, order: int, chunk: int = 16) -> BlockDerivatives:
    """F, J and H_diag of any block [.., d_in] -> [.., d_out] at ``centres`` [k, d_in] with torch.func."""
    from torch.func import functional_call, jacrev, jvp, vmap

    params = {k: v.detach() for k, v in block.named_parameters()}
    buffers = {k: v.detach() for k, v in block.named_buffers()}

    def f(x: torch.Tensor) -> torch.Tensor:  # [d_in] -> [d_out]
        return functional_call(block, (params, buffers), (x[None],))[0]

    with torch.no_grad():
        value = torch.cat([block(centres[s:s + 256]) for s in range(0, len(centres), 256)])
    out = BlockDerivatives(value=value.float())
    if order == 0:
        return out
    out.jacobian = torch.cat([vmap(jacrev(f))(centres[s:s + chunk]) for s in range(0, len(centres), chunk)]).float()
    if order == 2:
        d_in = centres.shape[1]
        eye = torch.eye(d_in, dtype=centres.dtype)

        def second(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:  # d^2 f / d x_e^2, [d_out]
            return jvp(lambda t: jvp(f, (t,), (e,))[1], (x,), (e,))[1]

        per_centre = vmap(lambda x: vmap(lambda e: second(x, e))(eye))  # [k, d_in, d_out]
        out.hessian_diag = torch.cat([per_centre(centres[s:s + 1]) for s in range(len(centres))]).transpose(1, 2)
        out.hessian_diag = out.hessian_diag.contiguous().float()
    return out


def block_derivatives(block: nn.Module, centres: torch.Tensor, order: int, hessian: str = "diag") -> BlockDerivatives:
    """Per-centre tensors of ``block`` at ``centres`` [k, d_in] for Taylor order 0, 1 or 2 (diagonal Hessian)."""
    if order not in (0, 1, 2):
        raise TmlpError(f"Taylor order must be 0, 1 or 2, got {order}")
    block = block.eval()
    if order == 2 and hessian == "full":
        with torch.no_grad():
            d_out = block(centres[:1]).shape[-1]
        raise refuse_full_hessian(len(centres), d_out, centres.shape[1])
    if is_closed_form_mlp(block):
        return mlp_derivatives(block, centres, order)
    return func_derivatives(block, centres, order)


# ---------------------------------------------------------------------------------------------------------------------
# Shared basis: per-centre tensors projected on U [d_out, r] and V [d_in, r]
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class SharedDerivatives:
    """Per-centre tensors of a shared-basis block: ``value`` F(C) [k, d_out], bases ``u`` [d_out, r] and
    ``v`` [d_in, r], ``s`` = Uᵀ J_c V [k, r, r], and for order 2 ``t`` [k, r, r]: Uᵀ times the second derivatives of
    F along each column of V (the diagonal Hessian in the rotated coordinates z = Vᵀ(x − C_c))."""

    value: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    s: torch.Tensor
    t: torch.Tensor | None = None


def jacobian_grams(block: nn.Module, centres: torch.Tensor, weights: torch.Tensor, chunk: int = 16
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_c w_c J_c J_cᵀ [d_out, d_out], Σ_c w_c J_cᵀ J_c [d_in, d_in]) accumulated over centre chunks."""
    gram_out = gram_in = None
    for s in range(0, len(centres), chunk):
        jac = block_derivatives(block, centres[s:s + chunk], 1).jacobian.double()
        w = weights[s:s + chunk].double()[:, None, None]
        go = (w * jac @ jac.transpose(1, 2)).sum(0)
        gi = (w * jac.transpose(1, 2) @ jac).sum(0)
        gram_out = go if gram_out is None else gram_out + go
        gram_in = gi if gram_in is None else gram_in + gi
    return gram_out, gram_in


@torch.no_grad()
def shared_derivatives(block: nn.Module, centres: torch.Tensor, order: int, u: torch.Tensor, v: torch.Tensor,
                       chunk: int = 16) -> SharedDerivatives:
    """F(C), S_c = Uᵀ J_c V and (order 2) T_c of ``block`` at ``centres`` [k, d_in] for the bases u, v."""
    if order not in (1, 2):
        raise TmlpError(f"a shared basis needs order 1 or 2, got {order}; order 0 has no Jacobian to share")
    block = block.eval()
    if is_closed_form_mlp(block):
        w1 = block.fc1.weight.double()
        b1 = block.fc1.bias.double() if block.fc1.bias is not None else 0.0
        a = u.double().T @ block.fc2.weight.double()  # [r, hidden]
        b = w1 @ v.double()  # [hidden, r]
        d1, d2 = activation_derivatives(block.act, centres.double() @ w1.T + b1)
        out = SharedDerivatives(block(centres).float(), u, v, torch.einsum("rh,kh,hs->krs", a, d1, b).float())
        if order == 2:
            out.t = torch.einsum("rh,kh,hs->krs", a, d2, b * b).float()
        return out
    value = block_derivatives(block, centres, 0).value
    s = torch.cat([u.T @ block_derivatives(block, centres[i:i + chunk], 1).jacobian @ v
                   for i in range(0, len(centres), chunk)])
    out = SharedDerivatives(value, u, v, s.float())
    if order == 2:
        from torch.func import functional_call, jvp, vmap

        params = {k: p.detach() for k, p in block.named_parameters()}
        buffers = {k: b_.detach() for k, b_ in block.named_buffers()}

        def f(x: torch.Tensor) -> torch.Tensor:
            return functional_call(block, (params, buffers), (x[None],))[0]

        def second(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            return jvp(lambda t_: jvp(f, (t_,), (e,))[1], (x,), (e,))[1]

        along_v = torch.stack([vmap(lambda e: second(c, e))(v.T) for c in centres])  # [k, r, d_out]
        out.t = (along_v @ u).transpose(1, 2).contiguous().float()
    return out
