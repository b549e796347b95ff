"""genfast.nn: drop-in modules built on genfast's ops."""
from genfast.nn.dit import DiTAttention, DiTBlock
from genfast.nn.gaussian import DiagonalGaussian, GaussianPosterior
from genfast.nn.modulate import AdaLNModulate
from genfast.nn.vq import VectorQuantizer

__all__ = ["DiagonalGaussian", "GaussianPosterior", "AdaLNModulate", "VectorQuantizer", "DiTAttention", "DiTBlock"]
