"""genfast.nn"""
from genfast.nn.vq import VectorQuantizer

__all__ = ["VectorQuantizer"]
