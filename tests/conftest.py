"""Shared fixtures: tiny HF model directories (built once per session) and a real redis-server per test."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

pytest_plugins = ["tests.fixtures.redis_server", "tests.fixtures.tokenizer"]


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Build (once) and return the directory of a tiny model: model_factory("qwen2", tie=True)."""
    from tests.fixtures.models import build_tiny_model

    cache: dict = {}

    def make(arch: str = "llama", tie: bool = False):
        key = (arch, tie)
        if key not in cache:
            cache[key] = build_tiny_model(tmp_path_factory.mktemp(f"{arch}{'-tied' if tie else ''}"), arch, tie)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(model_factory):
    """A tiny Llama checkpoint directory."""
    return model_factory("llama")


@pytest.fixture(scope="session")
def tiny_qwen2(model_factory):
    """A tiny Qwen2 checkpoint directory (q/k/v bias, tied embeddings)."""
    return model_factory("qwen2", tie=True)
