"""genfast.nn"""
from genfast.nn.gaussian import DiagonalGaussian, GaussianPosterior
from genfast.nn.modulate import AdaLNModulate

__all__ = ["DiagonalGaussian", "GaussianPosterior", "AdaLNModulate"]
from genfast.nn.dit import DiTAttention, DiTBlock  # noqa: E402,F401
__all__ += ["DiTAttention", "DiTBlock"]
