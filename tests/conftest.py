"""Shared fixtures: one tiny official-format checkpoint per test session."""
from __future__ import annotations

import pytest

TEST_PROMPT = "The answer to life the universe and everything is of course"


@pytest.fixture(scope="session", autouse=True)
def _hermetic_host(tmp_path_factory):
    """The suite's expectations do not depend on this host's GPU (a GPU host's nvidia-smi would
    change plan's memory figures; tests that need one put a stand-in on PATH and set this back)
    nor on a disk-rate measurement cached by an earlier run (the cache goes to a session folder),
    nor on the speed of this host's cores (the session's cache holds the reference host's)."""
    import json

    from grok_deploy import host

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GROK_DEPLOY_NVIDIA_SMI", "")
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        rates = host.cache_file("compute-rate.json")
        rates.parent.mkdir(parents=True)
        rates.write_text(json.dumps({host.cpu_model(): {"flops": host.REF_CORE_FLOPS}}))
        yield


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """grok-1-tiny, seed 0, official format (ckpt-0/ + tokenizer.model). Treat as read-only."""
    from grok_deploy.checkpoint.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", "grok-1-tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    """The float32 reference model on the tiny checkpoint's weights."""
    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.model.generate import load_model

    return load_model(open_checkpoint(tiny_ckpt))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_ckpt):
    from grok_deploy.model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_ckpt / "tokenizer.model")
