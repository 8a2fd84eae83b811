"""Test setup: without a GPU, Triton kernels run in the interpreter on CPU tensors."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator with a fresh seed per test; the seed is printed so a failure can be replayed
    (``RANDATTN_TEST_SEED=<seed> pytest -k <test>``)."""
    replay = os.environ.get("RANDATTN_TEST_SEED")
    seed = int(replay) if replay else int.from_bytes(os.urandom(4), "little")
    print(f"[{request.node.name}] seed={seed}")
    return torch.Generator().manual_seed(seed)
