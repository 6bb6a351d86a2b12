"""Layers built on the ssm_kernels ops."""
from .mamba import Mamba
from .mamba2 import Mamba2
from .norm import RMSNormGated
