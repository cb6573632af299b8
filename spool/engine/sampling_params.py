"""SamplingParams: vLLM's sampling parameter names and semantics, validated at construction."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spool.engine.structured_outputs import StructuredOutputsParams

# Limits that keep one request from starving the sampler; the worker may tighten them.
MAX_LOGPROBS = 20
MAX_N = 64
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_LOGIT_BIAS = 1024  # entries; OpenAI's bias range is [-100, 100]
LOGIT_BIAS_LIMIT = 100.0
SEED_MASK = 2**64 - 1  # any Python int seed maps to a 64-bit generator seed


def generator_seed(seed: int | None, index: int) -> int | None:
    """The torch.Generator seed of completion `index` of a request seeded `seed` (None: unseeded)."""
    return None if seed is None else (seed + index) & SEED_MASK


class SamplingParams(BaseModel):
    """How to sample one prompt's completions (vLLM-compatible names and meanings)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, validate_default=True)

    n: int = Field(1, ge=1, le=MAX_N, description="Number of parallel completions of the prompt.")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 means greedy.")
    top_p: float = Field(1.0, ge=0.0, le=1.0, description="Nucleus mass; 0 means greedy (as OpenAI accepts it).")
    top_k: int = Field(0, ge=-1, description="0 or -1 disables top-k.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, description=(
        "Any integer (negative too); completion i uses generator seed (seed + i) mod 2**64."))
    max_tokens: int | None = Field(16, ge=1, description=(
        "New tokens per completion. None: the rest of max_model_len after the prompt (capped by what the whole "
        "KV cache holds), resolved by LLMEngine.add_request from the prompt length."))
    min_tokens: int = Field(0, ge=0)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS, description=(
        "Token id -> bias in [-100, 100], added to the logits before every other stage; ids past the model's "
        "vocabulary are rejected by LLMEngine.add_request."))
    structured_outputs: StructuredOutputsParams | None = Field(
        None, description="Constrain the text to a JSON schema, regex, choice, EBNF grammar or any JSON object.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        return v

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _ids_as_list(cls, v):
        return [] if v is None else v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_as_dict(cls, v):
        return {} if v is None else v

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, v: dict[int, float]) -> dict[int, float]:
        for token, bias in v.items():
            if token < 0:
                raise ValueError(f"logit_bias token id {token} is negative")
            if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                raise ValueError(f"logit_bias[{token}] = {bias} is outside [-100, 100]")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, v: list[str]) -> list[str]:
        for s in v:
            if not s:
                raise ValueError("stop strings must be non-empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _ids_nonneg(cls, v: list[int]) -> list[int]:
        if any(t < 0 for t in v):
            raise ValueError("stop_token_ids must be non-negative")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "SamplingParams":
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        return self

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0, or top_p 0: only the top token is left)."""
        return self.temperature < 1e-5 or self.top_p == 0.0

    @property
    def effective_top_k(self) -> int:
        """top_k with both 'disabled' spellings (0, -1) mapped to 0."""
        return max(self.top_k, 0)
