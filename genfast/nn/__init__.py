"""genfast.nn"""
from genfast.nn.gaussian import DiagonalGaussian, GaussianPosterior
from genfast.nn.vq import VectorQuantizer

__all__ = ["DiagonalGaussian", "GaussianPosterior", "VectorQuantizer"]
