"""Shared fixtures: real packaged models are loaded once per session (from the safetensors
cache; the first run of a fresh machine dequantizes them, 30-100 s)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.manual_seed(0)

#: the session fixtures that load a packaged pretrained model
REAL_FIXTURES = frozenset({"smollm2", "gemma3", "qwen2"})


def pytest_collection_modifyitems(config, items):
    """A test that uses a packaged model (directly or through another fixture) carries the
    ``real`` marker, so ``-m "not real"`` is the quick tier it claims to be."""
    unmarked = [item.nodeid for item in items
                if REAL_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("real") is None]
    if unmarked:
        raise pytest.UsageError("these tests load a packaged model but lack @pytest.mark.real: " + ", ".join(unmarked))


@pytest.fixture(scope="module")
def llama():
    """A tiny seeded random Llama (4 layers): hand-checkable, built in well under a second."""
    from circuits.models import tiny_model

    return tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2():
    from circuits.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    from circuits.models import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="session")
def qwen2():
    from circuits.models import load_model

    return load_model("qwen2.5-coder-0.5b")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test loudly."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
