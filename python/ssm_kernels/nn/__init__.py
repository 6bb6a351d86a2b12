"""Layers built on the ssm_kernels ops."""
from .s5 import S5  # noqa: F401
