"""Offline API mirroring vLLM's: LLM(model=PATH, **config).generate(prompts, sampling_params)."""
from __future__ import annotations

import itertools
import logging
import time
from typing import Sequence as Seq

from spool.engine.llm_engine import LLMEngine, PromptInput
from spool.engine.outputs import RequestOutput
from spool.engine.sampling_params import SamplingParams
from spool.engine.step_gc import step_gc

log = logging.getLogger(__name__)


class LLM:
    """Load a model once, then generate for many prompts with continuous batching."""

    def __init__(self, model: str, **config):
        self.engine = LLMEngine.from_kwargs(model, **config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        """The model's Hugging Face tokenizer."""
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Seq[PromptInput],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns RequestOutputs in input order."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts, list) and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        return self._run(prompts, params, use_tqdm)

    def chat(
        self,
        messages: list[dict] | Seq[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate (vLLM's
        arguments: tools, add_generation_prompt, continue_final_message, chat_template_kwargs)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.engine.apply_chat_template(c, tools=tools, add_generation_prompt=add_generation_prompt,
                                                   continue_final_message=continue_final_message,
                                                   chat_template_kwargs=chat_template_kwargs) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[PromptInput], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        eng = self.engine
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params):
            eng.add_request(rid, prompt, p)
        reqs = {rid: eng.requests[rid] for rid in ids}
        done, total, t0, last = 0, len(ids), time.monotonic(), 0.0
        # The collector out of the steps' way: the admitted requests frozen, young collections left to real growth.
        with step_gc(eng.config.max_running_seqs):
            while eng.has_unfinished_requests():
                for d in eng.step():
                    if d.finished and reqs[d.request_id].num_finished == len(reqs[d.request_id].outputs):
                        done += 1
                if use_tqdm and time.monotonic() - last > 1.0:
                    last = time.monotonic()
                    log.info("generate: %d/%d requests done, %.1f s", done, total, last - t0)
        return [reqs[rid].to_output() for rid in ids]
