"""reference stage: golden outputs of the reference model on the original weights.

Writes into `out`:
- `golden.json`: per prompt its text, prompt ids, greedy output ids, and per step the top-k
  token ids and logits;
- `logits.npz`: full-vocabulary logits of the first `full_logit_steps` steps per prompt
  (`prompt{i}` -> (steps, V) float32).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

TOP_K = 8


def run_reference(source, out, prompts: list[str], max_tokens: int, dtype: str = "float32",
                  preset: str | None = None, full_logit_steps: int = 4, batch: int = 4) -> dict:
    """Greedy reference generations of `prompts`; returns a summary for the stage manifest."""
    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.errors import UserError
    from grok_deploy.model.generate import generate, load_model
    from grok_deploy.model.tokenizer import load_tokenizer

    ckpt = open_checkpoint(source, preset=preset)
    tok = load_tokenizer(ckpt.tokenizer_path)
    from grok_deploy.model.tokenizer import fit_context

    ids = [fit_context(tok.encode(p), ckpt.config.sequence_len, f"verify.prompts.{i}") for i, p in enumerate(prompts)]
    for text, p in zip(prompts, ids):
        if not p:
            raise UserError(f"verify.prompts: {text!r} encodes to no tokens; remove it")
    model = load_model(ckpt, dtype)
    t0 = time.perf_counter()
    records, full = [], {}
    for lo in range(0, len(ids), batch):
        res = generate(model, ids[lo:lo + batch], max_tokens, return_logits=True)
        for j, logits in enumerate(res.logits):
            i = lo + j
            top = np.argsort(-logits, axis=-1, kind="stable")[:, :TOP_K]
            records.append({
                "text": prompts[i], "prompt_ids": ids[i], "output_ids": res.output_ids[j],
                "output_text": tok.decode(res.output_ids[j]),
                "top_ids": top.tolist(),
                "top_logits": np.take_along_axis(logits, top, -1).round(6).tolist(),
            })
            full[f"prompt{i}"] = logits[:full_logit_steps].astype(np.float32)
    seconds = time.perf_counter() - t0
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"config": ckpt.config.name, "dtype": dtype, "max_tokens": max_tokens, "top_k": TOP_K,
           "full_logit_steps": full_logit_steps, "prompts": records}
    (out / "golden.json").write_text(json.dumps(doc, indent=1))
    np.savez(out / "logits.npz", **full)
    return {"prompts": len(records), "max_tokens": max_tokens, "dtype": dtype,
            "tokens_per_s": round(len(records) * max_tokens / seconds, 2)}


def load_golden(ref_dir) -> tuple[dict, dict[str, np.ndarray]]:
    """The golden.json document and the full-logit arrays of a reference stage folder."""
    ref_dir = Path(ref_dir)
    doc = json.loads((ref_dir / "golden.json").read_text())
    with np.load(ref_dir / "logits.npz") as z:
        full = {k: z[k] for k in z.files}
    return doc, full


MIN_TEMPERATURE = 1e-4  # below it logits / T overflow float32 (use 0 for greedy)
MAX_TEMPERATURE = 100.0


def check_sampling(temperature: float, top_p: float, seed: int) -> None:
    """Refuse sampling settings that would crash, or silently mean greedy: UserError naming the flag."""
    from grok_deploy.errors import UserError

    if not math.isfinite(temperature) or temperature < 0 or temperature > MAX_TEMPERATURE:
        raise UserError(f"--temperature {temperature}: give a number from 0 (greedy) to {MAX_TEMPERATURE:g}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise UserError(f"--temperature {temperature}: below {MIN_TEMPERATURE:g} the scaled logits overflow; "
                        "use 0 for greedy decoding")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p}: give a number in (0, 1]")
    if not 0 <= seed < 1 << 64:
        raise UserError(f"--seed {seed}: give an integer from 0 to 2^64 - 1")


def cli_generate(args) -> int:
    """`grok-deploy generate`: the reference run of one prompt, on the CPU."""
    import torch

    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.errors import UserError
    from grok_deploy.model.generate import generate, load_model
    from grok_deploy.model.tokenizer import load_tokenizer

    check_sampling(args.temperature, args.top_p, args.seed)
    if args.max_tokens <= 0:
        raise UserError(f"--max-tokens must be positive, got {args.max_tokens}")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"--prompt: not valid text (character {e.object[e.start]!r} at {e.start} cannot be "
                        "encoded as UTF-8); pass UTF-8 text") from None
    ckpt = open_checkpoint(args.ckpt, preset=args.preset)
    tok = load_tokenizer(ckpt.tokenizer_path)
    prompt_ids = tok.encode(args.prompt)
    if not prompt_ids:
        raise UserError("--prompt encodes to no tokens; give a non-empty prompt")
    from grok_deploy.model.tokenizer import fit_context

    context = ckpt.config.sequence_len
    if args.max_tokens >= context:
        raise UserError(f"--max-tokens {args.max_tokens}: {ckpt.config.name}'s {context} positions must leave room for "
                        f"the prompt; ask for at most {context - 1}")
    # left-truncated as the original does, keeping room for the new tokens
    prompt_ids = fit_context(prompt_ids, context - args.max_tokens,
                             f"--prompt (with room for {args.max_tokens} new tokens)")
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
