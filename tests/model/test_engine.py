"""TorchEngine: the engine protocol on the reference model equals `generate.generate`."""
from __future__ import annotations

import numpy as np
import pytest
from test_model import random_params

from grok_deploy.model.config import GrokConfig
from grok_deploy.model.engine import EngineError, TorchEngine, engine_generate
from grok_deploy.model.generate import generate
from grok_deploy.model.grok import Grok

PROMPTS = [[5, 6, 7], list(range(10, 22)), [40, 41, 0, 43, 44, 45, 46]]  # a pad inside the third


@pytest.fixture(scope="module")
def model():
    cfg = GrokConfig.from_name("grok-1-tiny", num_layers=3)
    m = Grok(cfg)
    m.load_params(random_params(cfg))
    return m.eval()


def test_engine_generate_equals_reference_greedy_and_sampled(model):
    eng = TorchEngine(model, max_batch_size=4, max_seq_len=64)
    for temperature, top_p in ((0.0, 1.0), (0.8, 0.9)):
        ref = generate(model, PROMPTS, 10, temperature, top_p, seed=3, return_logits=True)
        got = engine_generate(eng, PROMPTS, 10, temperature, top_p, seed=3, return_logits=True)
        assert got.output_ids == ref.output_ids
        for a, b in zip(got.logits, ref.logits):
            assert np.abs(a - b).max() < 1e-4
    assert not eng.slots.slot  # every sequence removed


def test_in_flight_add_step_remove_in_any_order(model):
    eng = TorchEngine(model, max_batch_size=2, max_seq_len=32)
    a, b = PROMPTS[0], PROMPTS[1]
    la = eng.add("a", a)
    ta = [int(la.argmax())]
    for _ in range(3):  # "a" decodes alone first
        ta.append(int(eng.step(["a"], [ta[-1]])[0].argmax()))
    lb = eng.add("b", b)
    tb = [int(lb.argmax())]
    for _ in range(4):  # then both, listed in the other order
        rows = eng.step(["b", "a"], [tb[-1], ta[-1]])
        tb.append(int(rows[0].argmax()))
        ta.append(int(rows[1].argmax()))
    eng.remove("a")
    eng.add("c", [9, 9])  # reuses a's slot
    assert ta == generate(model, [a], 8).output_ids[0]
    assert tb == generate(model, [b], 5).output_ids[0]


def test_errors_name_the_problem(model):
    eng = TorchEngine(model, max_batch_size=1, max_seq_len=8)
    eng.add(1, [5, 6])
    with pytest.raises(EngineError, match="already live"):
        eng.add(1, [5])
    with pytest.raises(EngineError, match="slots are busy"):
        eng.add(2, [5])
    with pytest.raises(EngineError, match="unknown sequence 7"):
        eng.step([7], [1])
    eng.remove(1)
    with pytest.raises(EngineError, match="leaves no room"):
        eng.add(3, list(range(4, 12)))
    assert eng.vocab_size == model.cfg.vocab_size and eng.max_seq_len == 8
