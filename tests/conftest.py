import os

import pytest
import torch

# Tests run on small CPU models; one thread keeps timings stable and lets the
# Ray fixture's workers share the two cores without oversubscription.
torch.set_num_threads(1)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test session."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_model():
    from scdd_ray.models import create_model

    torch.manual_seed(0)
    return create_model("resnet18", 4, width=0.125)
