"""package stage: the Triton model repository (`triton_repo/`) from templates kept as package data.

Templates are rendered strictly: a variable the caller gives that the template lacks, or one the
template has that the caller does not give, is an error, and no `${` may survive (Triton would
read "Expected integer, got: $"). Each config is then parsed with Triton's ModelConfig protobuf.
The python models come from grok_deploy/serving/triton_models/; the SentencePiece tokenizer.model is
copied into the repository, beside a Hugging Face tokenizer folder built from it (model/hf_tokenizer.py):
`<repo>/preprocessing/tokenizer/` loads with AutoTokenizer.from_pretrained (genai-perf --tokenizer). Layout and I/O: triton-serving.md §1-7.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from importlib import resources
from pathlib import Path

from grok_deploy.errors import UserError

MODELS = ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls")
CODE = {"preprocessing": "preprocessing.py", "postprocessing": "postprocessing.py",
        "tensorrt_llm_bls": "tensorrt_llm_bls.py", "tensorrt_llm": "tensorrt_llm.py"}  # -> <model>/1/model.py
ENGINE_KINDS = ("onnxruntime", "torch", "trtllm")
TOKENIZER_DIR = "tokenizer"  # inside preprocessing/ and postprocessing/, relative to the model folder
_VAR = re.compile(r"\$\{(\w+)\}")


def template(name: str) -> str:
    return resources.files("grok_deploy.serving").joinpath("templates", name).read_text(encoding="utf-8")


class Fragment(str):
    """Template text already rendered (a config fragment), inserted verbatim."""


_BARE = re.compile(r"[A-Za-z0-9_.+-]+")  # numbers, true/false, enum names: what may stand unquoted


def _literal(value, quoted: bool, var: str, name: str) -> str:
    """`value` as config text: escaped inside a quoted string, else one bare token. Anything else
    is refused, so that no value (a folder name with `"` in it) can add or change config fields."""
    text = str(value)
    if "${" in text:
        raise UserError(f"{name}: a value contains '${{'; template values must be literal")
    if isinstance(value, Fragment):
        return text
    if any(not c.isprintable() for c in text):
        raise UserError(f"{name}: {var} = {text!r} has control characters; rename it (a path: its folder)")
    if quoted:  # protobuf text format string: backslash and quotes escaped, UTF-8 kept
        return text.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")
    if not _BARE.fullmatch(text):
        raise UserError(f"{name}: {var} = {text!r} is not a single number or word")
    return text


def render(text: str, values: dict, name: str = "template") -> str:
    """Fill every `${var}` of `text` from `values`; unknown or unfilled variables are errors.
    A value inside quotes ("${var}") is escaped; an unquoted one must be one bare token."""
    wanted = set(_VAR.findall(text))
    unknown, missing = sorted(set(values) - wanted), sorted(wanted - set(values))
    if unknown or missing:
        raise UserError(f"{name}: " + "; ".join(
            ([f"unknown template variable(s) {', '.join(unknown)}"] if unknown else [])
            + ([f"unfilled template variable(s) {', '.join(missing)}"] if missing else [])))

    def fill(m: re.Match) -> str:
        quoted = m.string[m.start() - 1:m.start()] == '"' and m.string[m.end():m.end() + 1] == '"'
        return _literal(values[m.group(1)], quoted, m.group(1), name)

    return _VAR.sub(fill, text)


def parse_config(text: str, name: str = "config.pbtxt"):
    """Triton's ModelConfig protobuf (from tritonclient) of a config.pbtxt text; UserError if invalid."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise UserError(f"{name}: not a valid Triton model config ({e})") from None


def _bool(v: bool) -> str:
    return "true" if v else "false"


def model_values(cfg, engine_kind: str, engine_dir: Path) -> dict[str, dict]:
    """Template values per template (`tensorrt_llm_io` is the I/O fragment both tensorrt_llm
    variants include as `${tensorrt_llm_io}`)."""
    e, t = cfg.engine, cfg.triton
    batch = {"triton_max_batch_size": e.max_batch_size}
    queue = {"max_queue_delay_microseconds": t.max_queue_delay_microseconds, "max_queue_size": 0}
    # the OpenAI frontend sends exclude_input_in_output only for a completion's `echo`: a chat
    # would echo the prompt unless the model's default is off (as in the frontend's own test models)
    openai = cfg.server.openai_port is not None
    llm = {**batch, **queue, "decoupled_mode": _bool(t.decoupled), "engine_dir": str(engine_dir),
           "exclude_input_in_output": _bool(openai)}
    if engine_kind == "trtllm":
        llm.update(triton_backend="tensorrtllm", batching_strategy=t.batching_strategy,
                   kv_cache_free_gpu_mem_fraction=t.kv_cache_free_gpu_mem_fraction,
                   batch_scheduler_policy="guaranteed_no_evict", enable_chunked_context="false",
                   cancellation_check_period_ms=100)
    else:
        llm.update(triton_backend="python", engine_kind=engine_kind, engine_max_batch_size=e.max_batch_size,
                   max_input_len=e.max_input_len, max_seq_len=e.max_seq_len)
    return {
        "preprocessing": {**batch, **queue, "tokenizer_dir": TOKENIZER_DIR, "add_special_tokens": "false",
                          "preprocessing_instance_count": t.preprocessing_instance_count},
        "tensorrt_llm": llm,
        "tensorrt_llm_io": {"logits_datatype": "TYPE_FP32", "encoder_input_features_data_type": "TYPE_FP16"},
        "postprocessing": {**batch, "tokenizer_dir": TOKENIZER_DIR, "skip_special_tokens": "true",
                           "postprocessing_instance_count": t.postprocessing_instance_count},
        "ensemble": {**batch, "logits_datatype": "TYPE_FP32", **sequence_key_maps(engine_kind)},
        "tensorrt_llm_bls": {**batch, "decoupled_mode": _bool(t.decoupled), "logits_datatype": "TYPE_FP32",
                             "bls_instance_count": t.bls_instance_count, "accumulate_tokens": _bool(t.bls_accumulate_tokens),
                             "tensorrt_llm_model_name": "tensorrt_llm"},
    }


def sequence_key_maps(engine_kind: str) -> dict:
    """The ensemble's route of the python tensorrt_llm's `grok_sequence_key` to postprocessing's
    SEQUENCE_KEY (which names it when it stops a cancelled sequence); none for the C++ backend."""
    if engine_kind == "trtllm":
        return {"sequence_key_output": Fragment(""), "sequence_key_input": Fragment("")}
    return {"sequence_key_output": Fragment('      output_map { key: "grok_sequence_key" value: "_SEQUENCE_KEY" }'),
            "sequence_key_input": Fragment('      input_map { key: "SEQUENCE_KEY" value: "_SEQUENCE_KEY" }')}


def _source_manifest(cfg) -> dict:
    from grok_deploy.manifest import read_manifest

    man = read_manifest(cfg.output("source"))
    if man is None:
        raise UserError(f"{cfg.output('source')}: no complete source stage; run `grok-deploy run --stages source` "
                        "or pass the tokenizer and engine folder")
    return man


def _check_engine(kind: str, engine_dir: Path) -> None:
    need = {"onnxruntime": "manifest.json", "trtllm": "config.json", "torch": "tokenizer.model"}[kind]
    if not (engine_dir / need).is_file():
        raise UserError(f"{engine_dir}: no {need}; this is not a {kind} "
                        f"{'checkpoint' if kind == 'torch' else 'engine'} folder (run the build stage first)")


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def render_configs(cfg, kind: str, engine_dir: Path) -> dict[str, tuple[str, str]]:
    """{model: (template name, config.pbtxt text)}, each parsed with Triton's ModelConfig."""
    values = model_values(cfg, kind, engine_dir)
    out = {}
    for model in MODELS:
        name = "tensorrt_llm_python.pbtxt" if model == "tensorrt_llm" and kind != "trtllm" else f"{model}.pbtxt"
        vals = dict(values[model])
        if model == "tensorrt_llm":
            vals["tensorrt_llm_io"] = Fragment(render(template("tensorrt_llm_io.pbtxt"), values["tensorrt_llm_io"],
                                                      "tensorrt_llm_io.pbtxt"))
        text = render(template(name), vals, name)
        parse_config(text, f"{model}/config.pbtxt")
        out[model] = (name, text)
    return out


def package(cfg, out, tokenizer=None, engine_dir=None, engine_kind: str | None = None) -> dict:
    """Write the model repository `out` for pipeline `cfg`; returns its manifest.

    engine_kind: `onnxruntime` or `trtllm` (default: cfg.engine.backend), or `torch` (the
    reference model on a checkpoint folder, served by the same python model; for tests).
    engine_dir: default cfg's engines folder (torch: the source checkpoint). tokenizer: default
    the source stage's tokenizer.model.
    """
    from grok_deploy import __version__
    from grok_deploy.errors import space_errors
    from grok_deploy.manifest import atomic_dir
    from grok_deploy.model.hf_tokenizer import write_hf_tokenizer
    from grok_deploy.model.tokenizer import check_tokenizer_file

    kind = engine_kind or cfg.engine.backend
    if kind not in ENGINE_KINDS:
        raise UserError(f"engine kind {kind!r}: use one of {', '.join(ENGINE_KINDS)}")
    if engine_dir is None:
        engine_dir = _source_manifest(cfg)["checkpoint"] if kind == "torch" else cfg.output("engines")
    engine_dir = Path(engine_dir).resolve()
    tokenizer = Path(tokenizer or _source_manifest(cfg)["tokenizer"])
    if not tokenizer.is_file():
        raise UserError(f"{tokenizer}: tokenizer.model not found; pass the checkpoint's SentencePiece model")
    check_tokenizer_file(tokenizer)  # before it is copied twice
    _check_engine(kind, engine_dir)
    configs = render_configs(cfg, kind, engine_dir)
    models = {}
    with space_errors(out, None, "the model repository"), atomic_dir(out, "package") as tmp:
        for model, (name, text) in configs.items():
            version = tmp / model / "1"
            version.mkdir(parents=True)
            (tmp / model / "config.pbtxt").write_text(text)
            code = None if model == "tensorrt_llm" and kind == "trtllm" else CODE.get(model)
            if code:
                src = resources.files("grok_deploy.serving").joinpath("triton_models", code)
                (version / "model.py").write_text(src.read_text(encoding="utf-8"))
                # The python backend's stub runs Python isolated (-I: PYTHONDONTWRITEBYTECODE is
                # ignored) and would write model.py's bytecode here, into a finished repository.
                # A plain file of that name makes the byte-compiler skip the write.
                (version / "__pycache__").write_text("")
            else:
                (version / ".keep").write_text("")  # Triton needs a numeric version folder
            if model in ("preprocessing", "postprocessing"):
                (tmp / model / TOKENIZER_DIR).mkdir()
                shutil.copyfile(tokenizer, tmp / model / TOKENIZER_DIR / "tokenizer.model")
                # the same tokenizer as a Hugging Face folder, for AutoTokenizer users (genai-perf,
                # the backend's own preprocessing and client tools): identical ids
                write_hf_tokenizer(tokenizer, tmp / model / TOKENIZER_DIR)
            models[model] = {"template": name, "code": code, "config_sha256": _sha256_bytes(text.encode())}
        manifest = {"produced_by": "grok-deploy package", "version": __version__, "models": models,
                    "engine": {"kind": kind, "dir": str(engine_dir)},
                    "tokenizer": {"source": str(tokenizer.resolve()), "sha256": _sha256_bytes(tokenizer.read_bytes())},
                    "values": model_values(cfg, kind, engine_dir),
                    "max_batch_size": cfg.engine.max_batch_size, "decoupled": cfg.triton.decoupled,
                    "hf_tokenizer": f"preprocessing/{TOKENIZER_DIR}"}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
