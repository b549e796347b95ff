"""genfast.nn"""
from genfast.nn.modulate import AdaLNModulate  # noqa: E402,F401
