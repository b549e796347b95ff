"""genfast.nn"""
from genfast.nn.dit import DiTAttention, DiTBlock  # noqa: E402,F401
