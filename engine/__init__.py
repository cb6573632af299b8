"""spool's generation engine: continuous batching over a paged KV cache (no Redis); AsyncLLMEngine steps it on
a thread for asyncio callers."""
from engine.async_engine import AsyncEngineArgs, AsyncEngineDeadError, AsyncLLMEngine, random_uuid
from engine.config import ConfigError, EngineConfig, ModelConfig
from engine.distributed import TensorParallelError
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, Logprob, RequestDelta, RequestOutput
from engine.sampling_params import SamplingParams
from engine.structured_outputs import StructuredOutputsParams

__all__ = [
    "AsyncEngineArgs",
    "AsyncEngineDeadError",
    "AsyncLLMEngine",
    "random_uuid",
    "LLM",
    "LLMEngine",
    "SamplingParams",
    "StructuredOutputsParams",
    "RequestOutput",
    "CompletionOutput",
    "RequestDelta",
    "Logprob",
    "EngineConfig",
    "ModelConfig",
    "ConfigError",
    "TensorParallelError",
]
