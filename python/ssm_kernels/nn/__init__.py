"""Layers built on the ssm_kernels ops."""
from .longconv import LongConv
from .mamba import Mamba
from .mamba2 import Mamba2
from .mamba3 import Mamba3
from .norm import RMSNormGated
from .s4 import S4
from .s4d import S4D
from .s5 import S5

__all__ = ["LongConv", "Mamba", "Mamba2", "Mamba3", "RMSNormGated", "S4", "S4D", "S5"]
