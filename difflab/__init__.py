"""difflab: the diffusion-models reading list, implemented as composable PyTorch components."""

__version__ = "0.1.0"
