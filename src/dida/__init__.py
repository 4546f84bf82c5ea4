"""dida: unsupervised domain-adaptive semantic segmentation (DIDA on top of DAFormer) in plain PyTorch."""

__version__ = "0.1.0"
