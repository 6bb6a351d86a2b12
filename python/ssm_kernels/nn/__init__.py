"""Layers built on the ssm_kernels ops."""
from .mamba import Mamba
