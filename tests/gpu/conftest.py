"""GPU tests: marked `gpu`, skipped where CUDA is not available (CI), run by scripts/gpu-check."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu-check on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
