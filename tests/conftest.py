import os

import torch

# A private local Ray instance per test session; token auth is for shared clusters.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Tests run tiny CPU models; one thread keeps their timings stable on 2 cores.
torch.set_num_threads(1)


import pytest


@pytest.fixture
def tiny_model():
    from scdd_ray.models.factory import create_model

    torch.manual_seed(0)
    return create_model("resnet18", 4, width=0.125)


@pytest.fixture(scope="session")
def ray_session():
    """One private Ray instance for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
