"""berdiff-fast: conditional Bernoulli diffusion (BerDiff) for binary medical image segmentation.

    import berdiff_fast
    model = berdiff_fast.BerDiff.load("model.safetensors")
    out = berdiff_fast.sample(model, images, steps=50, k=16)
    out.masks, out.probs, out.saliency, out.uncertainty
"""
from .model import BerDiff
from .sampling import SampleResult, sample
from .schedule import NoiseSchedule

__version__ = "0.1.0"
__all__ = ["BerDiff", "NoiseSchedule", "SampleResult", "sample", "__version__"]
