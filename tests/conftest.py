import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def cuda_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


requires_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not cuda_available():
            item.add_marker(skip)
