"""tmlp: replace the MLP blocks of a trained network by Taylor expansions and deploy them with onnxruntime."""
__version__ = "0.1.0"

from tmlp.errors import TmlpError  # noqa: E402
from tmlp.taylor import TaylorConfig, TaylorMLP  # noqa: E402
from tmlp.surgery import taylorize_  # noqa: E402

__all__ = ["TaylorConfig", "TaylorMLP", "TmlpError", "taylorize_", "__version__"]
