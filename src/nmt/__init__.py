"""nmt: a PyTorch encoder-decoder Transformer trainer for machine translation."""

__version__ = "0.1.0"
