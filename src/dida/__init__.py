"""dida: unsupervised domain-adaptive semantic segmentation in plain PyTorch (DAFormer, DIDA, HRDA, MIC).

``dida.load_model(checkpoint)`` returns a ready ``Predictor`` (see ``dida.api``); the command line is ``dida``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Predictor", "__version__", "load_model"]


def __getattr__(name: str) -> Any:  # the Python API, imported on first use (it imports torch)
    if name in ("load_model", "Predictor"):
        from dida import api

        return getattr(api, name)
    raise AttributeError(f"module 'dida' has no attribute {name!r}")
