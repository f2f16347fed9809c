"""Triton kernels for the fused Bernoulli ops (installed as berdiff_fast.kernels). See issue #3."""


def is_available(device) -> bool:
    return False
