"""berdiff-fast: conditional Bernoulli diffusion (BerDiff) for binary medical image segmentation."""
from .schedule import NoiseSchedule

__version__ = "0.1.0"
__all__ = ["NoiseSchedule"]
