"""Generation over the KV cache, with the original runner's sampling (grok1-model.md §11)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .model import Grok

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
    generator = torch.Generator().manual_seed(seed)

    logits = model(tokens, cache=cache, start=torch.zeros(b, dtype=torch.long))
    step_logits = logits[torch.arange(b), lengths - 1]  # (B, V) last real position
    pos = lengths.clone()
    out: list[list[int]] = [[] for _ in range(b)]
    kept: list[list[np.ndarray]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    for step in range(max_new_tokens):
        nxt = sample(step_logits, temperature, top_p, generator)
        for i in range(b):
            if not done[i]:
                out[i].append(int(nxt[i]))
                if return_logits:
                    kept[i].append(step_logits[i].numpy().copy())
        if stop_at_eos:
            done |= nxt == cfg.eos_id
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        step_logits = model(nxt[:, None], cache=cache, start=pos)[:, 0]
        pos += 1
    return Generation([list(p) for p in prompts], out,
                      [np.stack(k) if k else np.zeros((0, cfg.vocab_size), np.float32) for k in kept]
                      if return_logits else None)


def load_model(ckpt, dtype: str = "float32", progress: bool = False) -> Grok:
    """A reference model with the checkpoint's weights (read one tensor at a time)."""
    model = Grok(ckpt.config, dtype=torch.float32 if dtype == "float32" else torch.bfloat16)
    model.load_params(dict(ckpt.params()))
    return model.eval()


def cli_generate(args) -> int:
    from .checkpoint import open_checkpoint
    from .tokenizer import load_tokenizer

    if args.max_tokens <= 0:
        from .errors import UserError
        raise UserError(f"--max-tokens must be positive, got {args.max_tokens}")
    ckpt = open_checkpoint(args.ckpt, preset=args.preset)
    tok = load_tokenizer(ckpt.tokenizer_path)
    prompt_ids = tok.encode(args.prompt)
    if not prompt_ids:
        from .errors import UserError
        raise UserError("--prompt encodes to no tokens; give a non-empty prompt")
    model = load_model(ckpt, args.dtype)
    torch.manual_seed(args.seed)
    res = generate(model, [prompt_ids], args.max_tokens, args.temperature, args.top_p, args.seed,
                   return_logits=args.logits)
    text = tok.decode(res.output_ids[0])
    if args.json:
        doc = {"prompt_ids": prompt_ids, "output_ids": res.output_ids[0], "text": text}
        if args.logits:
            doc["logits"] = res.logits[0].tolist()
        print(json.dumps(doc))
    else:
        print(args.prompt + text)
    return 0
