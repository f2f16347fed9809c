"""Build script: the pure-Python package, plus the C++/CUDA extension where torch is present.

torch is never a build requirement (it would pull a multi-GB wheel into an isolated build
environment); install with ``pip install --no-build-isolation -e .`` against the torch you have.
"""
from setuptools import setup

setup(
    packages=["berdiff_fast", "berdiff_fast.kernels"],
    package_dir={"berdiff_fast": "berdiff_fast", "berdiff_fast.kernels": "kernels"},
)
