"""Layers built on the ssm_kernels ops."""
from .mamba import Mamba
from .mamba2 import Mamba2
from .norm import RMSNormGated
from .s4 import S4
from .s4d import S4D
from .longconv import LongConv
