"""Engine and model configuration: defaults in one place, validated once at start-up."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # fp8 = e4m3 (torch.float8_e4m3fn), as in vLLM


class ConfigError(ValueError):
    """A model directory or engine setting that spool cannot run with."""


def priority_rows(max_num_seqs: int, priority_reserve: float) -> int:
    """Rows priority-0 work may run beyond max_num_seqs beside bulk work (the scheduler's reserve of rows)."""
    return int(max_num_seqs * priority_reserve)


@dataclass(slots=True)
class ModelConfig:
    """The decoder shape, read from a Hugging Face config.json."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    sliding_window: int | None
    dtype: torch.dtype | None
    eos_token_ids: list[int] = field(default_factory=list)
    # config.json's quantization_config as written (spool/engine/quantization/checkpoint_formats.py reads it).
    quantization_config: dict | None = None
    # The scheme the projections run in ("fp8" or None), decided at load from the above and EngineConfig.
    quantization: str | None = None

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        """Parse config.json, accepting top-level rope_theta/rope_scaling and transformers 5's rope_parameters."""
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; spool supports "
                + ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope_params = dict(cfg.get("rope_parameters") or {})
        rope_scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rtype = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            rope_scaling["rope_type"] = rtype
            if rtype == "default":
                rope_scaling = None
            elif rtype not in ("llama3", "linear"):
                raise ConfigError(f"unsupported rope_scaling type {rtype!r}; supported: default, linear, llama3")
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        bias = bool(cfg.get("attention_bias", False))
        dtype_name = cfg.get("dtype") or cfg.get("torch_dtype")
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", family == "mistral") else None
        return cls(
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if family == "qwen2" else bias,
            o_bias=bias if family in ("llama", "mistral") else False,
            qk_norm=family == "qwen3",
            sliding_window=window,
            dtype=DTYPES.get(str(dtype_name)) if dtype_name else None,
            eos_token_ids=eos_ids,
            quantization_config=cfg.get("quantization_config") or None,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        """Read <path>/config.json."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not path.is_dir():
            raise ConfigError(f"model directory {str(path)!r} does not exist")
        if not cfg_file.is_file():
            raise ConfigError(f"model directory {str(path)!r} has no config.json")
        try:
            return cls.from_dict(json.loads(cfg_file.read_text()))
        except KeyError as e:
            raise ConfigError(f"{cfg_file} lacks required field {e.args[0]!r}") from None


@dataclass(slots=True)
class EngineConfig:
    """Every engine knob, with its default; the CLI and LLM(**kwargs) map onto these fields."""

    model: str
    tokenizer: str | None = None
    device: str = "auto"  # "cpu" | "cuda" | "cuda:N" | "auto"
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    # Tokens per KV block. 64 measured faster than 16 on the H200 (fifth session: fp8 weights + fp8 KV +5.3%, qwen3-0.6b
    # +5.3%, llama3-8b bf16 +0.5%); prefix-cache hits count whole blocks, so many short shared prefixes may want 16.
    block_size: int = 64
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 512
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    load_format: str = "auto"  # "auto" | "safetensors" | "dummy"
    seed: int = 0
    enable_prefix_caching: bool = True
    # Schedule step N+1 while step N runs (spool/engine/async_step.py). None: on for CUDA; off on the CPU, where the
    # device work runs inside launch() and there is nothing to overlap (results would only come a step later).
    async_scheduling: bool | None = None
    # Fraction of KV blocks that admitting work of priority > 0 (the worker's bulk jobs) must leave free, and the
    # same fraction of max_num_seqs as extra rows that priority-0 (interactive) work may run beside it: bulk keeps
    # max_num_seqs rows and interactive work rarely has to preempt anything to start (spool/engine/scheduler.py).
    priority_reserve: float = 0.05
    # While priority-0 requests keep arriving (one within interactive_window_s), a step carries at most this many
    # prompt tokens of worse priority, so steps stay short and an interactive first token never waits behind a
    # long bulk prefill step (0: no cap). Offline runs (every request priority 0) are never capped.
    interactive_prefill_tokens: int = 4096
    interactive_window_s: float = 10.0
    # Meanwhile bulk prompt chunks and bulk decodes take turns in separate steps, and an interactive request's
    # first step carries no bulk work (scheduler.py). On, with the cap at 4096: on an H200 (bench/RESULTS.md,
    # seventh session, two alternated pairs) it kept the bulk ratio of mixed steps capped at 2048 (90.3-93.7% vs
    # 90.6-92.9%) and cut interactive TTFT p90 from 184-222 ms to 110-126 ms.
    interactive_split_steps: bool = True
    # Host memory for the KV of preempted sequences (spool/engine/swap.py). None: 4 GiB on CUDA, none on the CPU.
    swap_space_bytes: int | None = None
    swap_min_tokens: int = 128  # preempted sequences with fewer computed tokens are recomputed, not swapped
    kernel_backend: str = "auto"  # "auto" | "torch" | "triton"
    enforce_eager: bool = False  # True disables CUDA graphs
    # Steps with prompt tokens, up to this many tokens, replay piecewise CUDA graphs: every layer's work but attention
    # (spool/engine/piecewise_graphs.py). None: measured at start-up, the size below which an eager step's host time
    # exceeds its GPU time (all sizes for a small model, ~1-2k tokens for an 8B one); 0: never. On an H200
    # (bench/RESULTS.md, eighth session): bulk beside interactive probes 94.3% vs 91.1-92.8% eager, qwen3-0.6b
    # +7.1% on a slow host, bulk runs otherwise within noise.
    piecewise_graph_tokens: int | None = None
    quantization: str | None = None  # None | "fp8" (W8A8); an FP8 checkpoint runs in fp8 either way

    def __post_init__(self) -> None:
        # SPOOL_QUANTIZATION= (empty) or "none" from the environment means no quantization.
        if isinstance(self.quantization, str) and self.quantization.lower() in ("", "none"):
            self.quantization = None
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype) | "fp8" (e4m3, per-layer k/v scales: checkpoint or 1.0)
    tensor_parallel_size: int = 1  # ranks (one process and one device each) the model is sharded over
    grammar_compile_timeout_s: float = 60.0  # a structured-output request whose grammar is not compiled by then fails

    @property
    def max_running_seqs(self) -> int:
        """Most sequences one step may hold: max_num_seqs, plus the priority-0 rows beside bulk work (the
        scheduler's max_rows; the runner sizes its decode graphs for it)."""
        return self.max_num_seqs + priority_rows(self.max_num_seqs, self.priority_reserve)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        """Build from keyword arguments, rejecting unknown names with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; known: {sorted(known - {'model'})}")
        return cls(model=str(model), **kwargs)

    def resolve_device(self) -> torch.device:
        """The torch device: 'auto' picks CUDA when present."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but torch sees no CUDA GPU")
        if dev.type not in ("cpu", "cuda"):
            raise ConfigError(f"unsupported device {self.device!r}; use 'cpu' or 'cuda'")
        return dev

    def resolve_async_scheduling(self, device: torch.device) -> bool:
        """Explicit setting wins; None (auto) is on for CUDA devices with one rank (tensor parallel: off, the
        other ranks cannot see tokens that stay on rank 0's device)."""
        if self.async_scheduling is None:
            return device.type == "cuda" and self.tensor_parallel_size == 1
        return self.async_scheduling

    def resolve_swap_space_bytes(self, device: torch.device) -> int:
        """Explicit setting wins; None is 4 GiB on CUDA and 0 (recompute only) on the CPU or under tensor
        parallelism (a swap would move rank 0's blocks only)."""
        if self.swap_space_bytes is not None:
            return self.swap_space_bytes
        return 4 << 30 if device.type == "cuda" and self.tensor_parallel_size == 1 else 0

    def resolve_dtype(self, model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
        """Explicit dtype wins; 'auto' is the checkpoint's dtype on CUDA (fp32 checkpoints run bf16) and fp32 on CPU."""
        name = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if name != "auto":
            if name not in DTYPES:
                raise ConfigError(f"unsupported dtype {self.dtype!r}; use one of auto, {', '.join(DTYPES)}")
            return DTYPES[name]
        if device.type == "cpu":
            return torch.float32
        if model_cfg.dtype in (None, torch.float32):
            return torch.bfloat16
        return model_cfg.dtype

    def resolve_kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's element type: the model dtype for 'auto', float8_e4m3fn for 'fp8'."""
        if self.kv_cache_dtype == "auto":
            return model_dtype
        if self.kv_cache_dtype in ("fp8", "fp8_e4m3"):
            return torch.float8_e4m3fn
        raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} (got {self.kv_cache_dtype!r})")

    def validate(self) -> None:
        """Reject settings that cannot work, with a message naming the setting."""
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ConfigError(f"block_size must be one of 8, 16, 32, 64, 128 (got {self.block_size})")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError("num_kv_blocks must be >= 1")
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise ConfigError("gpu_memory_utilization must be in [0.05, 0.99]")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.piecewise_graph_tokens is not None and self.piecewise_graph_tokens < 0:
            raise ConfigError(f"piecewise_graph_tokens must be >= 0 (0: off), got {self.piecewise_graph_tokens}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ConfigError(f"load_format must be auto, safetensors or dummy (got {self.load_format!r})")
        if (self.swap_space_bytes is not None and self.swap_space_bytes < 0) or self.swap_min_tokens < 1:
            raise ConfigError("swap_space_bytes must be >= 0 and swap_min_tokens >= 1")
        if not 0.0 <= self.priority_reserve < 1.0:
            raise ConfigError(f"priority_reserve must be in [0, 1) (got {self.priority_reserve})")
        if self.interactive_prefill_tokens < 0 or not self.interactive_window_s >= 0:
            raise ConfigError("interactive_prefill_tokens and interactive_window_s must be >= 0")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"kernel_backend must be auto, torch or triton (got {self.kernel_backend!r})")
        if self.quantization not in (None, "fp8"):
            raise ConfigError(f"quantization must be fp8 or unset (got {self.quantization!r})")
        if not self.grammar_compile_timeout_s > 0:
            raise ConfigError(f"grammar_compile_timeout_s must be > 0 (got {self.grammar_compile_timeout_s})")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} "
                              f"(got {self.kv_cache_dtype!r})")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1 (got {self.tensor_parallel_size})")

    def validate_for(self, model_cfg: ModelConfig) -> None:
        """Reject settings this model cannot run with: its heads and MLP must split evenly over the ranks."""
        tp = self.tensor_parallel_size
        if tp == 1:
            return
        if self.async_scheduling:
            raise ConfigError("async_scheduling needs tensor_parallel_size 1 (tensor parallel steps run synchronously)")
        if self.swap_space_bytes:
            raise ConfigError("swap_space_bytes needs tensor_parallel_size 1 (tensor parallel preemption recomputes)")
        c = model_cfg
        if c.num_heads % tp:
            raise ConfigError(f"tensor_parallel_size {tp} must divide the model's {c.num_heads} attention heads")
        if c.num_kv_heads % tp and tp % c.num_kv_heads:
            raise ConfigError(f"tensor_parallel_size {tp} and the model's {c.num_kv_heads} KV heads must divide "
                              "one another (fewer KV heads than ranks are replicated)")
        if c.intermediate_size % tp:
            raise ConfigError(f"tensor_parallel_size {tp} must divide the model's intermediate_size "
                              f"{c.intermediate_size}")
        device = self.resolve_device()
        if device.type == "cuda":
            first = device.index or 0
            if first + tp > torch.cuda.device_count():
                raise ConfigError(f"tensor_parallel_size {tp} from cuda:{first} needs GPUs cuda:{first}.."
                                  f"cuda:{first + tp - 1}, but torch sees {torch.cuda.device_count()}")
