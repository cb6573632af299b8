"""spool's generation engine: continuous batching over a paged KV cache (no Redis); AsyncLLMEngine steps it on
a thread for asyncio callers."""
from spool.engine.async_engine import AsyncEngineArgs, AsyncEngineDeadError, AsyncLLMEngine, random_uuid
from spool.engine.config import ConfigError, EngineConfig, ModelConfig
from spool.engine.distributed import TensorParallelError
from spool.engine.llm import LLM
from spool.engine.llm_engine import LLMEngine
from spool.engine.outputs import CompletionOutput, Logprob, RequestDelta, RequestOutput
from spool.engine.sampling_params import SamplingParams
from spool.engine.structured_outputs import StructuredOutputsParams

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
