"""Generation over the KV cache, with the original runner's sampling (grok1-model.md §11)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from grok_deploy.model.grok import Grok

MASKED = -1e10  # the original's value for filtered-out logits


def nucleus_filter(logits: Tensor, top_p: float) -> Tensor:
    """The original's top-p: sort ascending, softmax, find the first index whose cumulative
    probability is >= 1 - p, and keep every logit >= that logit. p = 1 keeps everything."""
    if top_p >= 1.0:
        return logits
    sorted_logits, _ = torch.sort(logits, dim=-1)  # ascending
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    first = torch.searchsorted(cum, torch.full((*cum.shape[:-1], 1), 1.0 - top_p, dtype=cum.dtype))
    first = first.clamp(max=logits.shape[-1] - 1)
    threshold = torch.gather(sorted_logits, -1, first)
    return torch.where(logits >= threshold, logits, torch.full_like(logits, MASKED))


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """logits (B, V) f32 -> token ids (B,). Greedy (argmax) when temperature == 0."""
    if temperature <= 0.0:
        return logits.argmax(-1)
    filtered = nucleus_filter(logits / temperature, top_p)
    return torch.multinomial(torch.softmax(filtered, dim=-1), 1, generator=generator)[:, 0]


@dataclass
class Generation:
    prompt_ids: list[list[int]]
    output_ids: list[list[int]]
    logits: list[np.ndarray] | None  # per prompt (N, V): the logits that chose each token


@torch.no_grad()
def generate(model: Grok, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, return_logits: bool = False,
             stop_at_eos: bool = False) -> Generation:
    """Batched generation of prompts of different lengths.

    Prompts are right-padded with pad id 0 for one prefill; each sequence then decodes at its own
    position (the original's per-slot `step`). EOS does not stop generation unless asked, as in
    the original runner.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cfg = model.cfg
    b = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    t = int(lengths.max())
    cache = model.new_cache(b, t + max_new_tokens)
    tokens = torch.full((b, t), cfg.pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    logits = model(tokens, cache=cache, start=torch.zeros(b, dtype=torch.long))
    pos = lengths.clone()

    def advance(nxt: Tensor) -> Tensor:
        out = model(nxt[:, None], cache=cache, start=pos)[:, 0]
        pos.add_(1)
        return out

    first = logits[torch.arange(b), lengths - 1]  # (B, V) last real position
    out, kept = decode_loop(first, advance, max_new_tokens, temperature, top_p, seed, return_logits,
                            stop_at_eos, cfg.eos_id)
    return Generation([list(p) for p in prompts], out, kept)


def decode_loop(first: Tensor, advance, max_new_tokens: int, temperature: float, top_p: float,
                seed: int, return_logits: bool, stop_at_eos: bool, eos_id: int
                ) -> tuple[list[list[int]], list[np.ndarray] | None]:
    """The shared sampling loop: `first` (B, V) are the prefill logits, `advance(tokens (B,))`
    returns the next step's (B, V). Returns the generated ids and, if asked, per sequence the
    (N, V) logits that chose them. A sequence that emitted EOS keeps decoding (its tokens are
    dropped) until all are done, as the batch steps together."""
    b, vocab = first.shape
    generator = torch.Generator().manual_seed(seed)
    out: list[list[int]] = [[] for _ in range(b)]
    kept: list[list[np.ndarray]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    step_logits = first
    for step in range(max_new_tokens):
        nxt = sample(step_logits, temperature, top_p, generator)
        for i in range(b):
            if not done[i]:
                out[i].append(int(nxt[i]))
                if return_logits:
                    kept[i].append(step_logits[i].numpy().copy())
        if stop_at_eos:
            done |= nxt == eos_id
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        step_logits = advance(nxt)
    if not return_logits:
        return out, None
    return out, [np.stack(k) if k else np.zeros((0, vocab), np.float32) for k in kept]


def load_model(ckpt, dtype: str = "float32", progress: bool = False) -> Grok:
    """A reference model with the checkpoint's weights (read one tensor at a time)."""
    model = Grok(ckpt.config, dtype=torch.float32 if dtype == "float32" else torch.bfloat16)
    model.load_params(dict(ckpt.params()))
    return model.eval()
