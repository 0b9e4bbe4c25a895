"""The Taylor math, in PyTorch and nothing else (no ONNX, no onnxruntime).

- ``block``: the Taylor modules that replace an MLP (``TaylorMLP`` dense, ``SharedTaylorMLP`` shared basis).
- ``derivatives``: values, Jacobians and Hessian diagonals of a block at its centres.
- ``basis``: the shared bases U, V.  ``partition``: which centre serves a token.  ``fit``: least-squares tensors.
"""
from tmlp.spec import TaylorConfig
from tmlp.taylor.block import SharedTaylorMLP, TaylorMLP, build_taylor_block
from tmlp.taylor.derivatives import BlockDerivatives, SharedDerivatives, block_derivatives
from tmlp.taylor.fit import CellSums, accumulate_, cell_features, solve_cells
from tmlp.taylor.partition import nearest_centre, partition_projection

__all__ = ["BlockDerivatives", "CellSums", "SharedDerivatives", "SharedTaylorMLP", "TaylorConfig", "TaylorMLP",
           "accumulate_", "block_derivatives", "build_taylor_block", "cell_features", "nearest_centre",
           "partition_projection", "solve_cells"]

# The modules' public home: printed model trees, pickles and the module scopes torch.onnx writes into each node of
# an exported graph name the class by the path users import it from (as numpy does for its public functions).
for _cls in (SharedTaylorMLP, TaylorMLP):
    _cls.__module__ = __name__
del _cls
