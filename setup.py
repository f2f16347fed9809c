"""Build script: the pure-Python package, plus the C++/CUDA extensions where torch is present.

torch is never a build requirement (it would pull a multi-GB wheel into an isolated build
environment); install with ``pip install --no-build-isolation -e .`` against the torch you have.

Extensions (csrc/):
- ``berdiff_fast._C``: the torch.ops.berdiff schemas and the CPU kernels, built whenever torch
  imports;
- ``berdiff_fast._C_cuda``: the CUDA kernels, built when torch is a CUDA build and a GPU is
  visible, or FORCE_CUDA=1 (e.g. a build machine without a GPU). TORCH_CUDA_ARCH_LIST defaults
  to "9.0" (H100/H200).
BERDIFF_NO_EXT=1 builds neither: the package then runs on its Triton and torch backends.
"""
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CXX_FLAGS = [
    "-O3",
    "-g0",  # Python's CFLAGS carry -g: debug info would double the compile time
    # Strict IEEE arithmetic, the same in every build (CMake's too): no fused multiply-adds.
    "-ffp-contract=off",
    # Lets GCC if-convert the branch-free elementary functions so the kernel loops vectorise;
    # values are unchanged (only floating-point exception flags could differ).
    "-fno-trapping-math",
]
NVCC_FLAGS = ["-O3", "-lineinfo"]  # the C++ standard: torch's choice (C++20 from torch 2.13)


def _prefer_cuda_home() -> None:
    # /usr/local/bin/nvcc may be a wrapper, from which torch would guess CUDA_HOME=/usr/local;
    # the toolkit itself lives in /usr/local/cuda. Must run before torch.utils.cpp_extension loads.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _sources(*patterns):
    import glob

    return sorted(os.path.relpath(p, HERE) for pat in patterns for p in glob.glob(os.path.join(HERE, pat)))


def _extensions():
    if os.environ.get("BERDIFF_NO_EXT") == "1":
        return [], {}
    try:
        import torch
    except ImportError:
        return [], {}
    _prefer_cuda_home()
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    include = [os.path.join(HERE, "csrc")]
    # at::parallel_for is an OpenMP pragma inlined from ATen's headers: without -fopenmp the CPU
    # kernels would run on one thread. The libgomp it links is the one torch has already loaded.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    exts = [
        CppExtension(
            "berdiff_fast._C",
            ["csrc/torch_bindings.cpp", *_sources("csrc/cpu/*.cpp")],
            include_dirs=include,
            extra_compile_args={"cxx": CXX_FLAGS + openmp},
            extra_link_args=openmp,
        )
    ]
    want_cuda = torch.version.cuda is not None and (
        torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1")
    if want_cuda:
        from torch.utils.cpp_extension import CUDAExtension

        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        exts.append(
            CUDAExtension(
                "berdiff_fast._C_cuda",
                _sources("csrc/cuda/*.cpp", "csrc/cuda/*.cu"),
                include_dirs=include,
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            )
        )
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=["berdiff_fast", "berdiff_fast.kernels"],
    package_dir={"berdiff_fast": "berdiff_fast", "berdiff_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
