"""Test setup: the Triton interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, so it happens here, before
any test module imports sta_dist.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
