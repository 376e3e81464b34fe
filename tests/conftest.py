import torch

# Tests run tiny CPU models; one thread keeps their timings stable on 2 cores.
torch.set_num_threads(1)


import pytest


@pytest.fixture
def tiny_model():
    from scdd_ray.models import create_model

    torch.manual_seed(0)
    return create_model("resnet18", 4, width=0.125)
