"""genfast.nn"""
from genfast.nn.gaussian import DiagonalGaussian, GaussianPosterior

__all__ = ["DiagonalGaussian", "GaussianPosterior"]
