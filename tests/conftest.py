import os

# Triton kernels run on CPU tensors through the interpreter; this must be set before any
# @triton.jit function is created, hence before the package import.
if not os.environ.get("BERDIFF_TEST_CUDA_TRITON"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=False)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, os.cpu_count() or 1))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def one_thread():
    # Tiny 16x16 models gain nothing from a second thread, and on a shared machine OpenMP
    # barriers of two threads can cost more than the work.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
