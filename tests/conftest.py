"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch

from turnwise.config import ModelConfig
from turnwise.policy.load import load_policy


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory):
    """The tiny model with larger random weights, so greedy outputs differ by prompt and step."""
    model, tokenizer = load_policy(ModelConfig(cache_dir=str(tmp_path_factory.getbasetemp() / "models")))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.copy_(0.2 * torch.randn(weight.shape, generator=gen))
    return model, tokenizer


def pytest_configure(config: pytest.Config) -> None:
    """Without bubblewrap, sandboxed tools would refuse to run (as they should in training): here
    the tests that exercise them run the weaker layers instead, and the escape suite is skipped."""
    import os

    from turnwise.env._isolation import bwrap_problem

    problem = bwrap_problem()
    if problem is not None:
        os.environ["TURNWISE_SANDBOX_REQUIRE_ISOLATION"] = "0"
        config.issue_config_time_warning(pytest.PytestWarning(
            f"{problem}: sandbox tests run the weaker layers and the escape suite is skipped; "
            "install bubblewrap (apt-get install bubblewrap)"), stacklevel=2)
