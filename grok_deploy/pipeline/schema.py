"""pipeline.yaml: one typed schema, validated on load; every error names the key and its line.

`load_pipeline(path)` parses the YAML keeping each key's line (yaml_lines.py, from the node marks), validates
the types with pydantic (unknown keys refused), then checks what types cannot: parallel sizes
against the model preset, lengths, ports, plugins. Defaults live here and nowhere else.
Relative paths are relative to the pipeline file's folder.
"""
from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from grok_deploy.errors import UserError
from grok_deploy.manifest import overlaps
from grok_deploy.model.config import DEFAULT_PRESET, PRESETS, GrokConfig
from grok_deploy.pipeline.yaml_lines import line_of, read_yaml
from grok_deploy.serving.deploy import address_problem
from grok_deploy.serving.guard import ADMIN_KEY_RE
from grok_deploy.trtllm import compat, gpus
from grok_deploy.verify.report import Tolerances as _Tol

# Every number has an upper bound (the fuzz of issue 13 found overflows in plan's arithmetic and
# tracebacks on 5000-digit integers); floats are finite (allow_inf_nan=False below).
BIG = 1 << 20
PosInt = Annotated[int, Field(gt=0, le=BIG)]
PosFloat = Annotated[float, Field(gt=0, le=1e6)]
Count = Annotated[int, Field(gt=0, le=1024)]  # ranks, instances, workers
Port = Annotated[int, Field(ge=1, le=65535)]
Seed = Annotated[int, Field(ge=0, lt=1 << 63)]
PATH_KEYS = ("model.source.path", "model.source.tokenizer", "server.binary", "hardware.hostfile",
             *(f"outputs.{k}" for k in ("source", "reference", "trtllm_ckpt", "trtllm_preprocessed", "onnx",
                                         "engines", "triton_repo", "reports", "logs")))
Plugin = Literal["auto", "bfloat16", "float16", "float32", "disable"]  # auto: the pipeline's dtype
SHARDS_PROMPT = "The answer to life the universe and everything is of course"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Source(_Section):
    format: Literal["synthetic", "xai", "hf"] = "synthetic"
    path: str | None = None          # xai: folder with ckpt-0/; hf: folder with *.safetensors
    tokenizer: str | None = None     # default: the checkpoint's tokenizer.model
    seed: Seed = 0                   # synthetic only


class Model(_Section):
    preset: str = DEFAULT_PRESET
    source: Source = Source()


class Parallel(_Section):
    tp: Count = 1
    pp: Count = 1
    moe_tp: Count | None = None      # default tp // moe_ep
    moe_ep: Count | None = None      # default 1


class Engine(_Section):
    backend: Literal["onnxruntime", "trtllm"] = "onnxruntime"
    max_batch_size: PosInt = 8
    max_input_len: PosInt = 512
    max_seq_len: PosInt = 1024
    max_num_tokens: PosInt = 4096
    # ONNX Runtime engine weights: "none" keeps the dequantised float32 weights (exact against
    # the reference), "int8" stores them as 8-bit MatMulNBits (faster, verified by the int8 rule)
    onnx_quant: Literal["none", "int8"] = "none"
    # trtllm-build options (trtllm-checkpoint.md §8)
    gpt_attention_plugin: Plugin = "auto"
    gemm_plugin: Plugin = "auto"
    moe_plugin: Plugin = "auto"
    paged_kv_cache: bool = True
    remove_input_padding: bool = True
    use_paged_context_fmha: bool | None = None  # None: by version (off only where 0.11-era kernels
                                                # reject the soft-cap; off costs KV reuse)
    tokens_per_block: PosInt = 32
    workers: Count = 1
    # the TensorRT-LLM version the plan's flags are written for; auto: the installed one, else
    # trtllm.compat.ASSUMED. The build checks the installed one against the known-good range.
    trtllm_version: str = "auto"


class Triton(_Section):
    decoupled: bool = True
    preprocessing_instance_count: Count = 1
    postprocessing_instance_count: Count = 1
    bls_instance_count: Count = 1
    bls_accumulate_tokens: bool = False  # streamed BLS text: the whole text so far (true) or the new part
    batching_strategy: Literal["inflight_fused_batching", "V1"] = "inflight_fused_batching"
    kv_cache_free_gpu_mem_fraction: Annotated[float, Field(gt=0, le=1)] = 0.9
    max_queue_delay_microseconds: Annotated[int, Field(ge=0, le=3_600_000_000)] = 0


class Server(_Section):
    address: str = "127.0.0.1"
    grpc_port: Port = 8001
    http_port: Port = 8000
    metrics_port: Port = 8002
    binary: str = "auto"             # or the path of a tritonserver executable
    startup_timeout_s: PosFloat = 300.0
    openai_port: Port | None = None  # Triton's OpenAI frontend (in the TensorRT-LLM container) on this port
    admin_key: str | None = None     # the `admin-key` header of Triton's admin APIs; None: generated per start


class Hardware(_Section):
    gpu: Literal[tuple(gpus.GPUS)] | None = None  # sets the next two (trtllm/gpus.py); nvidia-smi's answer wins
    gpu_memory_gb: PosFloat = 80.0   # GB = 1e9 bytes; written here, it wins over hardware.gpu's
    hbm_bandwidth_gbps: PosFloat = 3350.0
    disk_read_gbps: PosFloat | None = None  # checkpoint reads, for the estimates; default: measured (host.py)
    gpus_per_node: Count = 8
    nodes: Count = 1                 # > 1: the ranks are spread over nodes, one tritonserver per rank
    hostfile: str | None = None      # MPI hostfile (`host slots=N` lines), needed when nodes > 1
    headroom_gb: Annotated[float, Field(ge=0, le=1e6)] = 4.3  # activations + workspace (~4 GiB, §9)


class VerifyTolerances(_Section):
    logit_tol: PosFloat = _Tol.logit_tol
    int8_logit_tol: PosFloat = _Tol.int8_logit_tol
    int8_tie_margin: Annotated[float, Field(ge=0, le=1e6)] = _Tol.int8_tie_margin


class Verify(_Section):
    prompts: Annotated[list[str], Field(min_length=1, max_length=1000)] = [SHARDS_PROMPT]
    max_tokens: PosInt = 16
    reference_dtype: Literal["float32", "bfloat16"] = "float32"
    # golden: reference run first, compare after; score: the server generates, the layer-streamed
    # reference scores its tokens (bounded memory); auto: score when golden would not fit the host
    mode: Literal["auto", "golden", "score"] = "auto"
    check_shards: bool = True        # run the TensorRT-LLM checkpoint rank by rank (gloo)
    shards_prompt: str = SHARDS_PROMPT
    tolerances: VerifyTolerances = VerifyTolerances()


class Outputs(_Section):
    source: str = "export/source"
    reference: str = "export/reference"
    trtllm_ckpt: str = "export/trtllm_ckpt"
    trtllm_preprocessed: str | None = None  # `grok-deploy preprocess` output; default: trtllm_ckpt + _preprocessed
    onnx: str = "export/onnx"
    engines: str = "engines"         # engines/<backend>
    triton_repo: str = "triton_repo"
    reports: str = "export/reports"
    logs: str = "export/logs"


class PipelineConfig(_Section):
    model: Model = Model()
    parallel: Parallel = Parallel()
    quantization: Literal["w8a16", "none"] = "w8a16"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    engine: Engine = Engine()
    triton: Triton = Triton()
    server: Server = Server()
    hardware: Hardware = Hardware()
    verify: Verify = Verify()
    outputs: Outputs = Outputs()

    _file: Path = PrivateAttr(default=Path("pipeline.yaml"))
    _lines: dict = PrivateAttr(default_factory=dict)

    @property
    def file(self) -> Path:
        return self._file

    @property
    def root(self) -> Path:
        return self._file.parent

    @property
    def grok(self) -> GrokConfig:
        """The model preset's hyper-parameters."""
        return PRESETS[self.model.preset]

    def verify_mode(self) -> tuple[str, str]:
        """(golden | score, why): verify.mode with `auto` resolved against this host's memory."""
        from grok_deploy.verify.score import resolve_mode

        return resolve_mode(self.verify.mode, self.grok, self.verify.reference_dtype)

    @property
    def world_size(self) -> int:
        return self.parallel.tp * self.parallel.pp

    def resolve(self, path: str | Path) -> Path:
        p = Path(path).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else self.root / p))

    def output(self, name: str) -> Path:
        """Folder of an `outputs:` entry; `engines` is per backend (engines/onnxruntime...)."""
        if name == "trtllm_preprocessed" and self.outputs.trtllm_preprocessed is None:
            ckpt = self.output("trtllm_ckpt")
            return ckpt.with_name(ckpt.name + "_preprocessed")
        out = self.resolve(getattr(self.outputs, name))
        return out / self.engine.backend if name == "engines" else out

    def get(self, key: str) -> Any:
        """Value at a dotted key path, e.g. `engine.max_seq_len`."""
        obj: Any = self
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj

    def at(self, key: str) -> str:
        """`pipeline.yaml line 12`: where a dotted key (or its closest written parent) is."""
        loc = tuple(int(p) if p.isdigit() else p for p in key.split("."))
        return f"{self._file.name} line {line_of(self._lines, loc)}"

    def where(self, key: str) -> str:
        """`pipeline.yaml line 12: engine.max_seq_len` for messages."""
        return f"{self.at(key)}: {key}"

    def fail(self, key: str, message: str) -> UserError:
        return UserError(f"{self.where(key)}: {message}")

    def missing_paths(self) -> list[tuple[str, Path]]:
        """(key, path) of the source paths that do not exist (`run` refuses, `plan` warns)."""
        src = self.model.source
        keys = (["model.source.path"] if src.format != "synthetic" else []) + (["model.source.tokenizer"] if src.tokenizer else [])
        return [(k, self.resolve(self.get(k))) for k in keys if not self.resolve(self.get(k)).exists()]


# --- validation ----------------------------------------------------------------------------

def _model_at(loc: tuple) -> type[BaseModel] | None:
    cls: Any = PipelineConfig
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        cls = next((a for a in (field.annotation, *typing.get_args(field.annotation))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cls is None:
            return None
    return cls


def _pydantic_message(err: dict) -> str:
    loc = err["loc"]
    if err["type"] == "extra_forbidden":
        known = list((_model_at(loc[:-1]) or PipelineConfig).model_fields)
        near = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        return f"unknown key; {hint}known keys here: {', '.join(known)}"
    if err["type"] == "model_type":
        return f"should be a mapping of keys (indented `key: value` lines), got {_short(err.get('input'))}"
    return f"{err['msg']} (got {_short(err.get('input'))})"


def _short(value, limit: int = 80) -> str:
    """repr of a value for a one-line message, cut to `limit` characters."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # ints of > 4300 digits, very deep lists
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_pipeline(path: str | Path = "pipeline.yaml") -> PipelineConfig:
    """Parse and validate a pipeline file; raises UserError naming the key and its line."""
    if "\0" in str(path):
        raise UserError(f"{str(path)!r}: the pipeline path contains a NUL character; pass a real file name")
    try:
        file = Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python 3.11)
        raise UserError(f"{path}: cannot resolve the pipeline path ({e}); pass an existing pipeline.yaml") from None
    data, lines = read_yaml(file)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{file.name} line 1: the pipeline must be a mapping of sections "
                        f"(model:, parallel:, engine: ...), got a {type(data).__name__}")
    if any(not isinstance(k, str) for k in data):
        raise UserError(f"{file.name} line 1: section names must be plain words (model:, parallel: ...), "
                        f"got {_short(next(k for k in data if not isinstance(k, str)))}")
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        first = errs[0]
        key = ".".join(map(str, first["loc"])) or "(document)"
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise UserError(f"{file.name} line {line_of(lines, tuple(first['loc']))}: {key}: "
                        f"{_pydantic_message(first)}{more}") from None
    cfg._file, cfg._lines = file, lines
    check(cfg)
    return cfg


def parallel_problem(m: GrokConfig, tp: int, pp: int, moe_tp: int, moe_ep: int) -> tuple[str, str] | None:
    """(key, message) of the first parallel layout the model cannot be split into, else None."""
    rules = [
        ("parallel.tp", m.num_kv_heads % tp, f"tp {tp} does not divide the {m.num_kv_heads} KV heads "
         f"(each rank holds whole KV heads; duplication is unsupported)"),
        ("parallel.tp", m.num_q_heads % tp, f"tp {tp} does not divide the {m.num_q_heads} query heads"),
        ("parallel.tp", m.vocab_size % tp, f"tp {tp} does not divide the vocabulary {m.vocab_size} (lm_head shards)"),
        ("parallel.moe_tp", moe_tp * moe_ep != tp, f"moe_tp {moe_tp} x moe_ep {moe_ep} = {moe_tp * moe_ep} must equal tp {tp}"),
        ("parallel.moe_tp", m.ffn_size % moe_tp, f"moe_tp {moe_tp} does not divide the expert FFN width {m.ffn_size}"),
        ("parallel.moe_ep", m.num_experts % moe_ep, f"moe_ep {moe_ep} does not divide the {m.num_experts} experts"),
        ("parallel.pp", m.num_layers % pp, f"pp {pp} does not divide the {m.num_layers} layers"),
    ]
    return next(((k, msg) for k, bad, msg in rules if bad), None)


def check_paths(cfg: PipelineConfig) -> None:
    """Paths: no NUL, none too long; output folders overlap neither the source, nor the
    pipeline's own folder, nor each other (a stage replaces its whole folder)."""
    for key in PATH_KEYS:
        value = cfg.get(key)
        if value is None:
            continue
        if "\0" in value:
            raise cfg.fail(key, "contains a NUL character; give a real path")
        if not value.strip():
            raise cfg.fail(key, "is empty; give a path")
        if len(os.fsencode(value)) > 4000 or any(len(os.fsencode(p)) > 255 for p in Path(value).parts):
            raise cfg.fail(key, "is too long for a path (4000 bytes, 255 per name)")
    outs = {name: cfg.output(name) for name in Outputs.model_fields}
    src = cfg.model.source
    sources = [("model.source.path", cfg.resolve(src.path))] if src.format != "synthetic" and src.path else []
    if src.tokenizer:
        sources.append(("model.source.tokenizer", cfg.resolve(src.tokenizer)))
    real_root = Path(os.path.realpath(cfg.root))
    for name, out in outs.items():
        if real_root.is_relative_to(os.path.realpath(out)):
            raise cfg.fail(f"outputs.{name}", f"{out} holds the pipeline's own folder {cfg.root}; a stage replaces "
                           f"its whole output folder: use a subfolder such as export/{name}")
    for name, out in outs.items():
        for skey, path in sources:
            if overlaps(out, path):
                raise cfg.fail(f"outputs.{name}", f"{out} overlaps {skey} {path}; output folders must lie outside "
                               "the source")
    for name, out in outs.items():
        for other, o in outs.items():
            if other < name and overlaps(out, o):
                raise cfg.fail(f"outputs.{name}", f"{out} overlaps outputs.{other} {o}; each stage needs a folder "
                               "of its own")


def check(cfg: PipelineConfig) -> None:
    """The checks types cannot express; fills moe_tp/moe_ep defaults."""
    check_paths(cfg)
    if cfg.model.preset not in PRESETS:
        raise cfg.fail("model.preset", f"unknown preset {_short(cfg.model.preset)}; known: {', '.join(sorted(PRESETS))}")
    m, par, eng, src = cfg.grok, cfg.parallel, cfg.engine, cfg.model.source
    if src.format != "synthetic" and not src.path:
        raise cfg.fail("model.source", f"format {src.format} needs `path:` (the checkpoint folder)")
    if par.moe_ep is None:
        par.moe_ep = par.tp // par.moe_tp if par.moe_tp and par.tp % par.moe_tp == 0 else 1
    if par.moe_tp is None:
        par.moe_tp = max(par.tp // par.moe_ep, 1)
    bad = parallel_problem(m, par.tp, par.pp, par.moe_tp, par.moe_ep)
    if bad:
        raise cfg.fail(*bad)
    if eng.max_input_len > eng.max_seq_len:
        raise cfg.fail("engine.max_input_len", f"{eng.max_input_len} is larger than engine.max_seq_len {eng.max_seq_len}")
    if eng.max_seq_len > m.sequence_len:
        raise cfg.fail("engine.max_seq_len", f"{eng.max_seq_len} exceeds {m.name}'s {m.sequence_len} positions")
    if cfg.verify.max_tokens >= eng.max_seq_len:
        raise cfg.fail("verify.max_tokens", f"{cfg.verify.max_tokens} leaves no room for a prompt in engine.max_seq_len {eng.max_seq_len}")
    if eng.backend == "trtllm":
        check_trtllm(cfg)
        if eng.moe_plugin == "disable" and cfg.quantization == "w8a16":
            raise cfg.fail("engine.moe_plugin", "weight-only (w8a16) MoE needs the MoE plugin; use auto or bfloat16")
        if eng.gpt_attention_plugin == "disable":
            raise cfg.fail("engine.gpt_attention_plugin", "the attention plugin carries Grok's tanh soft-cap; it cannot be disabled")
        if cfg.triton.batching_strategy != "V1" and not (eng.paged_kv_cache and eng.remove_input_padding):
            raise cfg.fail("engine.paged_kv_cache", "in-flight batching needs paged_kv_cache and remove_input_padding")
    bad_address = address_problem(cfg.server.address)
    if bad_address:
        raise cfg.fail("server.address", bad_address)
    if cfg.server.admin_key is not None and not re.fullmatch(ADMIN_KEY_RE, cfg.server.admin_key):
        raise cfg.fail("server.admin_key", f"{len(cfg.server.admin_key)} characters; use 16 to 256 letters, digits "
                       "and . _ ~ - (or leave it out: a key is generated per start)")
    ports = {"server.grpc_port": cfg.server.grpc_port, "server.http_port": cfg.server.http_port,
             "server.metrics_port": cfg.server.metrics_port}
    if len(set(ports.values())) < 3:
        key = next(k for k in list(ports)[1:] if list(ports.values()).count(ports[k]) > 1)
        raise cfg.fail(key, f"port {ports[key]} is used twice; the gRPC, HTTP and metrics ports must differ")
    for key, prompt in [*((f"verify.prompts.{i}", p) for i, p in enumerate(cfg.verify.prompts)),
                        ("verify.shards_prompt", cfg.verify.shards_prompt)]:
        if not prompt.strip():
            raise cfg.fail(key, "empty prompt")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # YAML's "\ud800" escape makes a lone surrogate
            raise cfg.fail(key, f"not valid Unicode text: {prompt[e.start]!r} at character {e.start} "
                           f"({e.reason}); write the character itself") from None


def check_trtllm(cfg: PipelineConfig) -> None:
    """What TensorRT-LLM cannot build or launch, refused at load: ranks over the nodes, dtypes
    without a weight-only path, a pinned version outside the known-good range."""
    hw, eng = cfg.hardware, cfg.engine
    if cfg.world_size > hw.nodes * hw.gpus_per_node:
        raise cfg.fail("parallel.tp", f"tp x pp = {cfg.world_size} ranks exceeds hardware.nodes {hw.nodes} x "
                       f"gpus_per_node {hw.gpus_per_node}; set hardware.nodes (and hardware.hostfile) for multi-node serving")
    if hw.nodes > 1:
        if cfg.world_size % hw.nodes:
            raise cfg.fail("hardware.nodes", f"{cfg.world_size} ranks do not spread evenly over {hw.nodes} nodes")
        if not hw.hostfile:
            raise cfg.fail("hardware.nodes", f"{hw.nodes} nodes need hardware.hostfile: an MPI hostfile with one "
                           f"`host slots={cfg.world_size // hw.nodes}` line per node")
    if cfg.quantization == "w8a16" and cfg.dtype == "float32":
        raise cfg.fail("dtype", compat.W8A16_FLOAT32)
    if eng.trtllm_version != "auto":
        try:
            problem = compat.version_problem(eng.trtllm_version)
        except UserError as e:  # not a version number at all
            raise cfg.fail("engine.trtllm_version", str(e)) from None
        if problem:
            raise cfg.fail("engine.trtllm_version", problem)
