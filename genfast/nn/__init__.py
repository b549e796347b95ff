"""genfast.nn"""
from genfast.nn.gaussian import DiagonalGaussian, GaussianPosterior
from genfast.nn.modulate import AdaLNModulate

__all__ = ["DiagonalGaussian", "GaussianPosterior", "AdaLNModulate"]
