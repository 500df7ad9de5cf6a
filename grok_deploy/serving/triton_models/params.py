"""Requests of the python-backend `tensorrt_llm` model, free of Triton (unit-tested).

`parse_request(inputs, ...)` checks one request's tensors (the TensorRT-LLM backend's names,
dtypes and shapes: triton-serving.md §3; both spellings of the renamed inputs, `min_length` /
`min_tokens` and `random_seed` / `seed`) and returns one `Params` per batch row, or raises
`BadRequest`. Sampling follows TensorRT-LLM's defaults: with neither `runtime_top_k` nor
`runtime_top_p` (top_p <= 0 counts as unset) it decodes greedily; otherwise top-k (k > 0), then
logits / T (default 1.0) and the original's nucleus filter (generate.sample), drawn from the
sequence's own torch.Generator (seeded with `seed`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MASKED = -1e10  # the original's value for filtered-out logits
# Request cost bounds (refused at parse time, before scheduling): a request's stop/bad words are
# checked at every decode step of the shared batch, so their size bounds what one request adds
# to every step. TensorRT-LLM sets no such limit; these are far above any real use.
MAX_WORDS = 1024         # words in one stop_words_list / bad_words_list row
MAX_WORD_TOKENS = 8192   # tokens of all the words of one list row ([2, N]: N <= this)


class BadRequest(ValueError):
    """A request we refuse; `code` is the pb_utils.TritonError code name."""

    def __init__(self, message: str, code: str = "INVALID_ARG"):
        super().__init__(message)
        self.code = code


@dataclass
class Params:
    """One sequence to generate (a batch row of a request), with the backend's defaults."""

    prompt: list[int]
    max_new: int                      # request_output_len
    end_id: int = -1                  # -1: never stops on a token (the backend's default)
    temperature: float = 1.0          # TensorRT-LLM's default
    top_k: int = 0                    # 0: unset (all tokens)
    top_p: float = 0.0                # 0: unset (no nucleus filter); both unset = greedy
    seed: int = 0
    min_tokens: int = 0
    stop_words: list[list[int]] = field(default_factory=list)
    bad_words: list[list[int]] = field(default_factory=list)
    embedding_bias: np.ndarray | None = None  # (V,) f32
    streaming: bool = False
    exclude_input: bool = False
    return_log_probs: bool = False
    return_generation_logits: bool = False
    return_perf_metrics: bool = False
    return_num_input_tokens: bool = False   # 1.x: num_input_tokens (INT32 [1]) on every response
    return_num_output_tokens: bool = False  # 1.x: num_output_tokens, the tokens each response carries
    # bad_words split once (see bad_split): (single-token words as an index array, longer words)
    _bad: tuple | None = field(default=None, repr=False, compare=False)

    def bad_split(self) -> tuple[np.ndarray, list[list[int]]]:
        """The bad words as (1-token words: one vectorised mask per step, longer words: a suffix
        test each), computed on the first step of the sequence."""
        if self._bad is None:
            single = np.array(sorted({w[0] for w in self.bad_words if len(w) == 1}), np.int64)
            self._bad = (single, [w for w in self.bad_words if len(w) > 1])
        return self._bad

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1 or (self.top_k == 0 and self.top_p <= 0.0)


# --- request parsing ------------------------------------------------------------------------

# inputs we accept but cannot honour: (name, the value that means "off")
UNSUPPORTED = {"beam_width": 1, "num_return_sequences": 1, "return_context_logits": False,
               "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
UNSUPPORTED_TENSORS = ("prompt_embedding_table", "lora_task_id", "lora_weights", "lora_config",
                       "draft_input_ids", "draft_logits", "encoder_input_features", "context_phase_params")
# accepted and not read: the KV-cache retention inputs (retention_token_range_*, retention_decode_*)
# rank reusable blocks for eviction; this engine keeps one private slot per sequence and reuses
# nothing, so there is nothing to rank
# accepted, refused with INVALID_ARG only when actually asked for (a non-empty value): the
# backend's own answers when the model instance has no guided decoder / lookahead configuration
NOT_CONFIGURED = {
    "guided_decoding_guide_type": "guided decoding needs a guided_decoding_backend, which this engine does not have",
    "guided_decoding_guide": "guided decoding needs a guided_decoding_backend, which this engine does not have",
    **{n: "Cannot set the request lookahead decoding configuration when model instance lookahead "
          "parameters are not set." for n in ("lookahead_window_size", "lookahead_ngram_size",
                                              "lookahead_verification_set_size")}}
ALIASES = {"min_length": "min_tokens", "random_seed": "seed"}  # <= v0.19 name -> >= v0.20 name
DTYPES = {"input_ids": np.int32, "input_lengths": np.int32, "request_output_len": np.int32,
          "end_id": np.int32, "pad_id": np.int32, "runtime_top_k": np.int32, "min_tokens": np.int32,
          "temperature": np.float32, "runtime_top_p": np.float32, "seed": np.uint64,
          "streaming": np.bool_, "exclude_input_in_output": np.bool_, "return_log_probs": np.bool_,
          "return_generation_logits": np.bool_, "stop": np.bool_, "stop_words_list": np.int32,
          "bad_words_list": np.int32, "embedding_bias": np.float32, "return_perf_metrics": np.bool_,
          "min_length": np.int32, "random_seed": np.uint64, "return_num_input_tokens": np.bool_,
          "return_num_output_tokens": np.bool_}


def _get(inputs: dict, name: str, batch: int | None = None):
    a = inputs.get(name)
    if a is None:
        return None
    want = DTYPES.get(name)
    if want is not None and a.dtype != want:
        raise BadRequest(f"input '{name}' must be {np.dtype(want).name}, got {a.dtype.name}")
    if batch is not None and a.shape[:1] != (batch,):
        raise BadRequest(f"input '{name}' has batch {a.shape[:1]}, expected ({batch},)")
    return a


def _scalar(inputs: dict, name: str, b: int, batch: int, default):
    a = _get(inputs, name, batch)
    return default if a is None else a.reshape(batch, -1)[b, 0].item()


def word_lists(a: np.ndarray | None, name: str = "words list") -> list[list[int]]:
    """[2, N] (row 0 flat ids, row 1 cumulative end offsets padded with -1) -> words; at most
    MAX_WORD_TOKENS tokens and MAX_WORDS words, checked before any is read."""
    if a is None or a.size == 0:
        return []
    if a.ndim != 2 or a.shape[0] != 2:
        raise BadRequest(f"a words list must be [2, N], got {list(a.shape)}")
    if a.shape[1] > MAX_WORD_TOKENS:
        raise BadRequest(f"{name}: {a.shape[1]} tokens; at most {MAX_WORD_TOKENS} per request row "
                         f"(words are checked at every decode step of the shared batch)")
    ends = a[1][: int(np.argmax(a[1] < 0)) if (a[1] < 0).any() else a.shape[1]]
    if ends.size > MAX_WORDS:
        raise BadRequest(f"{name}: {ends.size} words; at most {MAX_WORDS} per request row "
                         f"(words are checked at every decode step of the shared batch)")
    words, start = [], 0
    for end in ends:
        if not start < end <= a.shape[1]:
            raise BadRequest(f"words list offsets must increase within [1, {a.shape[1]}], got {a[1].tolist()}")
        words.append([int(t) for t in a[0, start:end]])
        start = int(end)
    return words


def parse_request(inputs: dict, max_input_len: int, vocab_size: int, decoupled: bool,
                  exclude_default: bool = False) -> list[Params]:
    """One Params per batch row; BadRequest (INVALID_ARG or UNSUPPORTED) for what we refuse."""
    inputs = dict(inputs)
    for old, new in ALIASES.items():
        if old in inputs:
            if new in inputs and not np.array_equal(inputs[old], inputs[new]):
                raise BadRequest(f"inputs '{old}' and '{new}' are two spellings of one input and differ; send one")
            inputs[new] = _get(inputs, old)
    for name, why in NOT_CONFIGURED.items():
        a = inputs.get(name)
        if a is not None and a.size and any(x not in (b"", "", 0) for x in a.reshape(-1).tolist()):
            raise BadRequest(f"input '{name}': {why}")
    for name in ("input_ids", "input_lengths", "request_output_len"):
        if name not in inputs:
            raise BadRequest(f"missing required input '{name}'")
    ids = _get(inputs, "input_ids")
    if ids.ndim != 2:
        raise BadRequest(f"input 'input_ids' must be [batch, tokens], got {list(ids.shape)}")
    if ids.shape[1] > max_input_len:  # before any row is read: the prompt's size is bounded
        raise BadRequest(f"prompt length ({ids.shape[1]} tokens per input_ids row) exceeds maximum input "
                         f"length ({max_input_len})")
    batch = ids.shape[0]
    if batch > 1 and not decoupled:
        raise BadRequest("batch > 1 requires the decoupled transaction policy")
    for name in UNSUPPORTED_TENSORS:
        if name in inputs and inputs[name].size:
            raise BadRequest(f"input '{name}' is not supported by this engine", "UNSUPPORTED")
    rows = []
    for b in range(batch):
        for name, off in UNSUPPORTED.items():
            a = inputs.get(name)
            if a is not None and a.reshape(batch, -1)[b, 0].item() != off:
                raise BadRequest(f"input '{name}' = {a.reshape(batch, -1)[b, 0].item()} is not supported "
                                 f"by this engine (only {off})", "UNSUPPORTED")
        n = _scalar(inputs, "input_lengths", b, batch, 0)
        if n <= 0:
            raise BadRequest(f"empty prompt (input_lengths {n}); send at least one token")
        if n > ids.shape[1]:
            raise BadRequest(f"input_lengths {n} is longer than input_ids ({ids.shape[1]} tokens)")
        if n > max_input_len:
            raise BadRequest(f"prompt length ({n}) exceeds maximum input length ({max_input_len})")
        prompt = [int(t) for t in ids[b, :n]]
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise BadRequest(f"input_ids must be in [0, {vocab_size}), got {min(prompt)}..{max(prompt)}")
        max_new = _scalar(inputs, "request_output_len", b, batch, 0)
        if max_new <= 0:
            raise BadRequest(f"request_output_len must be positive, got {max_new}")
        streaming = bool(_scalar(inputs, "streaming", b, batch, False))
        if streaming and not decoupled:
            raise BadRequest("Streaming is only supported if model is deployed using decoupled mode.")
        p = Params(prompt, max_new, end_id=_scalar(inputs, "end_id", b, batch, -1),
                   temperature=float(_scalar(inputs, "temperature", b, batch, 1.0)),
                   top_k=_scalar(inputs, "runtime_top_k", b, batch, 0),
                   top_p=float(_scalar(inputs, "runtime_top_p", b, batch, 0.0)),
                   seed=int(_scalar(inputs, "seed", b, batch, 0)),
                   min_tokens=_scalar(inputs, "min_tokens", b, batch, 0), streaming=streaming,
                   exclude_input=bool(_scalar(inputs, "exclude_input_in_output", b, batch, exclude_default)),
                   return_log_probs=bool(_scalar(inputs, "return_log_probs", b, batch, False)),
                   return_generation_logits=bool(_scalar(inputs, "return_generation_logits", b, batch, False)),
                   return_perf_metrics=bool(_scalar(inputs, "return_perf_metrics", b, batch, False)),
                   return_num_input_tokens=bool(_scalar(inputs, "return_num_input_tokens", b, batch, False)),
                   return_num_output_tokens=bool(_scalar(inputs, "return_num_output_tokens", b, batch, False)))
        if not (math.isfinite(p.temperature) and math.isfinite(p.top_p)):  # NaN passes `< 0` checks
            raise BadRequest(f"sampling inputs must be finite numbers: temperature {p.temperature}, "
                             f"runtime_top_p {p.top_p}")
        if p.top_k < 0 or not 0.0 <= p.top_p <= 1.0 or p.temperature < 0:
            raise BadRequest(f"sampling out of range: runtime_top_k {p.top_k} (>= 0), runtime_top_p "
                             f"{p.top_p} (0..1), temperature {p.temperature} (>= 0)")
        for name, attr in (("stop_words_list", "stop_words"), ("bad_words_list", "bad_words")):
            a = _get(inputs, name, batch)
            words = word_lists(None if a is None else a[b], name)
            if any(not 0 <= t < vocab_size for w in words for t in w):
                raise BadRequest(f"{name}: token ids must be in [0, {vocab_size})")
            setattr(p, attr, words)
        bias = _get(inputs, "embedding_bias", batch)
        if bias is not None and bias[b].size:
            if bias[b].ndim != 1 or bias[b].shape != (vocab_size,):
                raise BadRequest(f"embedding_bias must have {vocab_size} values, got {bias[b].size}")
            bad = np.flatnonzero(~np.isfinite(bias[b]))  # one NaN makes every logit NaN
            if bad.size:
                raise BadRequest(f"embedding_bias must be finite: {bad.size} value(s) are not, the first "
                                 f"at token {int(bad[0])} ({bias[b][bad[0]]})")
            p.embedding_bias = bias[b].astype(np.float32)
        rows.append(p)
    return rows


# --- sampling -------------------------------------------------------------------------------

def next_token(logits: np.ndarray, p: Params, context: list[int], n_out: int, generator):
    """(token, processed logits (V,) torch f32) for one sequence; context = prompt + output."""
    import torch

    from grok_deploy.model.generate import sample

    x = torch.from_numpy(np.array(logits, np.float32, copy=True))
    if p.embedding_bias is not None:
        x += torch.from_numpy(p.embedding_bias)
    if torch.isnan(x).any():  # argmax would still pick a token: garbage, not an answer
        raise FloatingPointError(f"the logits of this sequence have {int(torch.isnan(x).sum())} NaN value(s)")
    if n_out < p.min_tokens and 0 <= p.end_id < x.numel():
        x[p.end_id] = MASKED
    if p.bad_words:
        single, longer = p.bad_split()
        if single.size:
            x[torch.from_numpy(single)] = MASKED
        for w in longer:
            if context[-(len(w) - 1):] == w[:-1]:
                x[w[-1]] = MASKED
    if p.greedy:
        return int(x.argmax()), x
    y = x
    if 0 < p.top_k < y.numel():
        kth = torch.topk(y, p.top_k).values[-1]
        y = torch.where(y >= kth, y, torch.full_like(y, MASKED))
    top_p = p.top_p if p.top_p > 0.0 else 1.0  # unset: top-k (or plain) sampling, no nucleus filter
    return int(sample(y[None], p.temperature, top_p, generator)[0]), x
