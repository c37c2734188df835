"""gsa_compile: Gated Slot Attention kernels generated from a tile IR, for torch.compile."""
from .reference import parallel_gsa, recurrent_gsa
from .spec import GateLayout

__all__ = ["GateLayout", "parallel_gsa", "recurrent_gsa"]
__version__ = "0.1.0"
