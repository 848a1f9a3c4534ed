"""Nothing in the tests may reach the network: Hugging Face libraries run offline."""

import os

# forced, not defaulted: a shell that exported HF_HUB_OFFLINE=0 must not let a test go online
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state (torch, Python)."""
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Unit tests run tiny models on one intra-op thread: their ops are too small to gain
    from more, and two spinning thread pools on a shared 2-core machine make each op ~10x
    slower. The slow tests (real MiniLM) keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def job_assets(tmp_path_factory):
    """Tiny model and dataset folders for fine-pruning jobs (built once per session)."""
    from .models import job_assets as build

    return build(tmp_path_factory.mktemp("job-assets"))
