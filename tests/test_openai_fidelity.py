"""OpenAI fidelity: chat prompts exactly as the template says, tool calls, the new job fields, and batch
output lines that the openai SDK's own types accept."""
from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from spool.engine import LLM, LLMEngine, SamplingParams
from spool.producer import Client, JobError
from spool.protocol import parse_job
from spool.testing.tiny_model import build_tiny_model
from tests.worker_harness import running_worker
from spool.worker.chat import AUTO, NAMED, REQUIRED, constraint_of, tool_mode
from spool.worker.tool_calls import extract, named_call, parser_for

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
                                                           "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {},
                                                                              "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def qwen_style(tmp_path_factory):
    """A tiny model whose tokenizer renders no BOS, speaks Hermes tool calls and knows enable_thinking."""
    return build_tiny_model(tmp_path_factory.mktemp("qwen-style"), arch="qwen2", tokenizer_style="qwen")


def _template_ids(tokenizer, messages, **kw) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("style", ["llama", "qwen"])
def test_chat_prompt_ids_equal_the_templates_own_tokenization(style, tiny_llama, qwen_style):
    """(a) the template owns special tokens: one BOS on a Llama-3-style tokenizer, none on a Qwen-style one."""
    model = tiny_llama if style == "llama" else qwen_style
    llm = LLM(str(model), device="cpu", block_size=8)
    tok = llm.get_tokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    want = _template_ids(tok, msgs, add_generation_prompt=True)
    assert want.count(tok.bos_token_id) == (1 if style == "llama" else 0)
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert out.prompt_token_ids == want
    rendered = llm.engine.apply_chat_template(msgs)
    assert rendered["prompt_token_ids"] == want and rendered["prompt"] == tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)


def test_template_variables_tools_and_continue_final_message(qwen_style):
    eng = LLMEngine.from_kwargs(str(qwen_style), device="cpu", block_size=8)
    msgs = [{"role": "user", "content": "think?"}]
    plain = eng.apply_chat_template(msgs)["prompt"]
    assert "<think>" not in plain
    assert eng.apply_chat_template(msgs, chat_template_kwargs={"enable_thinking": False})["prompt"].endswith(
        "<think>\n\n</think>\n")
    assert '"get_weather"' in eng.apply_chat_template(msgs, tools=TOOLS)["prompt"]
    cont = eng.apply_chat_template([*msgs, {"role": "assistant", "content": "Well,"}], add_generation_prompt=False,
                                   continue_final_message=True)["prompt"]
    assert cont.endswith("<|assistant|>\nWell,")


def test_worker_renders_jobs_as_the_template_says(qwen_style, redis_url):
    """Messages with tool calls, tool results and null content are accepted and rendered, and
    usage.prompt_tokens is the template's own count."""
    eng = LLMEngine.from_kwargs(str(qwen_style), device="cpu", block_size=8, max_num_seqs=8)
    client = Client(redis_url)
    conversation = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    ok = client.enqueue(messages=conversation, tools=TOOLS, tool_choice="auto", max_tokens=4, temperature=0,
                        chat_template_kwargs={"enable_thinking": False})
    with running_worker(eng, redis_url):
        res = client.result(ok, timeout=60)
    template = eng.tokenizer.apply_chat_template(
        [parse_job(orjson.dumps({"messages": conversation})).messages[i].template_dict() for i in range(3)],
        tools=TOOLS, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert res.status == "completed", res.error
    assert res.usage.prompt_tokens == len(eng.tokenizer(template, add_special_tokens=False)["input_ids"])
    with pytest.raises(JobError, match="role"):  # a role no template knows is refused by the job schema
        client.enqueue(messages=[{"role": "narrator", "content": "x"}])


def test_a_role_the_template_refuses_fails_with_the_templates_message(tiny_llama, redis_url):
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=4)
    client = Client(redis_url)
    rid = client.enqueue(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                                   {"role": "tool", "tool_call_id": "c", "content": "z"}], max_tokens=2)
    with running_worker(eng, redis_url):
        res = client.result(rid, timeout=60)
    assert res.status == "failed" and res.error.code == "invalid_prompt" and "unknown role: tool" in res.error.message


def test_job_fields_openai_accepts():
    ok = parse_job(orjson.dumps({"prompt": "p", "top_p": 0, "seed": -7, "logit_bias": {"5": -100, "7": 3.5}}))
    assert ok.sampling_kwargs()["logit_bias"] == {5: -100.0, 7: 3.5} and ok.seed == -7 and ok.max_tokens is None
    for bad, needle in [
        ({"prompt": "p", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "p", "logit_bias": {"5": 101}}, "[-100, 100]"),
        ({"prompt": "p", "tools": TOOLS}, "need messages"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice needs tools"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
          "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in tools"),
        ({"prompt": "p", "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a+"}}, "not both"),
        ({"prompt": "p", "structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
        ({"messages": [{"role": "user", "content": None}]}, "needs content"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        ({"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}, "assistant"),
    ]:
        with pytest.raises(JobError) as err:
            parse_job(orjson.dumps(bad))
        assert needle in err.value.message, (bad, err.value.message)


def test_constraints_from_response_format_and_tool_choice():
    def job(**kw):
        return parse_job(orjson.dumps({"messages": [{"role": "user", "content": "x"}], **kw}))

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert constraint_of(job(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})) \
        == {"json": schema}
    assert constraint_of(job(response_format={"type": "json_object"})) == {"json_object": True}
    assert constraint_of(job(response_format={"type": "text"})) is None
    assert constraint_of(job(structured_outputs={"choice": ["yes", "no"]})) == {"choice": ["yes", "no"]}
    named = job(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert tool_mode(named) == NAMED and constraint_of(named) == {"json": TOOLS[0]["function"]["parameters"]}
    required = job(tools=TOOLS, tool_choice="required")
    assert tool_mode(required) == REQUIRED and constraint_of(required)["json"]["minItems"] == 1
    assert tool_mode(job(tools=TOOLS)) == AUTO and constraint_of(job(tools=TOOLS)) is None
    assert tool_mode(job(tools=TOOLS, tool_choice="none")) is None


def test_tool_call_parsers():
    hermes = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
             '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    content, calls = extract(hermes, AUTO, "hermes", "r1", 0)
    assert content == "Let me check." and [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert orjson.loads(calls[0].function.arguments) == {"city": "Paris"} and calls[0].id.startswith("call_")
    assert extract(hermes, AUTO, "hermes", "r1", 0)[1][0].id == calls[0].id  # stable: a rewrite is identical
    assert extract("no tools here", AUTO, "hermes", "r1", 0) == ("no tools here", [])
    assert extract("<tool_call>{not json</tool_call>", AUTO, "hermes", "r1", 0)[1] == []
    llama = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {}}'
    content, calls = extract(llama, AUTO, "llama3_json", "r2", 1)
    assert content is None and [c.function.name for c in calls] == ["get_weather", "get_time"]
    content, calls = extract('[{"name": "get_time", "parameters": {}}]', REQUIRED, "hermes", "r3", 0)
    assert content is None and calls[0].function.arguments == "{}"
    assert named_call('{"city": "Rome"}', "get_weather", "r4", 0)[0].function.arguments == '{"city": "Rome"}'
    assert parser_for("...<tool_call>...") == "hermes" and parser_for("<|python_tag|>") == "llama3_json"
    with pytest.raises(ValueError):
        parser_for(None, "xml")


def test_sampling_params_take_openai_values():
    SamplingParams(top_p=0.0)  # OpenAI accepts 0: greedy
    SamplingParams(seed=-1)
    SamplingParams(logit_bias={3: -100.0})
    with pytest.raises(ValidationError):
        SamplingParams(logit_bias={3: 101.0})


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,12}$"},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


def _line(cid: str, url: str = "/v1/chat/completions", **body) -> dict:
    base = {"model": "tiny"}
    if url.endswith("chat/completions") and "messages" not in body:
        base["messages"] = [{"role": "user", "content": f"request {cid}"}]
    if url.endswith("/completions") and not url.endswith("chat/completions") and "prompt" not in body:
        base["prompt"] = f"once upon {cid}"
    return {"custom_id": cid, "method": "POST", "url": url, "body": {**base, **body}}


COMPLETIONS = "/v1/completions"
EVERYTHING = [
    _line("plain", max_tokens=6, temperature=0, user="u-1", store=False, metadata={"k": "v"}, service_tier="auto"),
    _line("lp", max_tokens=5, logprobs=True, top_logprobs=3, seed=-11, top_p=0),
    _line("n2", max_tokens=4, n=2, seed=7, temperature=1.0),
    _line("schema", max_tokens=60, response_format={"type": "json_schema",
                                                     "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}),
    _line("object", max_tokens=40, response_format={"type": "json_object"}),
    _line("choice", max_tokens=10, structured_outputs={"choice": ["red", "green", "blue"]}),
    _line("regex", max_tokens=12, structured_outputs={"regex": "[a-c]{3}-[0-9]{2}"}),
    _line("named", max_tokens=60, tools=TOOLS,
          tool_choice={"type": "function", "function": {"name": "get_weather"}}),
    _line("required", tools=TOOLS, tool_choice="required", temperature=0),  # up to the end of the context
    _line("auto", max_tokens=8, tools=TOOLS, tool_choice="auto", parallel_tool_calls=True,
          chat_template_kwargs={"enable_thinking": False}),
    _line("replay", max_tokens=4, tools=TOOLS, messages=[
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "weather "}, {"type": "text", "text": "in Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "rain"}]),
    _line("bias", max_tokens=5, temperature=0, logit_bias={"77": 100}),
    _line("rest-of-context", temperature=0, stop=["\n"]),  # no max_tokens: up to the end of the context
    _line("c-plain", COMPLETIONS, max_tokens=5, temperature=0),
    _line("c-lp", COMPLETIONS, max_tokens=5, logprobs=3, echo=False),
    _line("c-ids", COMPLETIONS, prompt=[5, 6, 7, 8], max_tokens=4, logit_bias={"9": -100}),
]


def test_every_output_line_is_what_the_openai_sdk_reads(qwen_style, redis_url, tmp_path):
    """A batch using every supported field through a real worker: each output line parses as the openai SDK's
    ChatCompletion / Completion, constraints hold on random weights, and the batch object is a Batch."""
    import re

    from openai.types import Batch, Completion
    from openai.types.chat import ChatCompletion

    from spool.producer import batch

    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in EVERYTHING))
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    eng = LLMEngine.from_kwargs(str(qwen_style), device="cpu", block_size=8, max_num_seqs=16)
    client = Client(redis_url)
    with running_worker(eng, redis_url):
        info = batch.run(inp, out, err, batch_id="everything", client=client)
    errors = [orjson.loads(x) for x in err.read_bytes().splitlines()] if err.exists() else []
    assert info.status == "completed" and not errors, errors
    lines = {rec["custom_id"]: rec for rec in map(orjson.loads, out.read_bytes().splitlines())}
    assert sorted(lines) == sorted(x["custom_id"] for x in EVERYTHING)
    bodies = {}
    for cid, rec in lines.items():
        body = rec["response"]["body"]
        model = Completion if cid.startswith("c-") else ChatCompletion
        bodies[cid] = model.model_validate(body)
    assert bodies["lp"].choices[0].logprobs.content[0].bytes is not None
    assert all(len(t.top_logprobs) == 3 for t in bodies["lp"].choices[0].logprobs.content)
    assert len(bodies["n2"].choices) == 2
    person = orjson.loads(bodies["schema"].choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int) and 0 <= person["age"] <= 150
    assert bodies["schema"].choices[0].finish_reason == "stop"
    obj = bodies["object"].choices[0]  # any object: random weights may write a long one and hit max_tokens
    assert obj.message.content.startswith("{")
    if obj.finish_reason == "stop":
        assert isinstance(orjson.loads(obj.message.content), dict)
    assert bodies["choice"].choices[0].message.content in ("red", "green", "blue")
    assert re.fullmatch("[a-c]{3}-[0-9]{2}", bodies["regex"].choices[0].message.content)
    named = bodies["named"].choices[0].message
    assert named.content is None and named.tool_calls[0].function.name == "get_weather"
    assert "city" in orjson.loads(named.tool_calls[0].function.arguments)
    required = bodies["required"].choices[0]  # an array of calls: random weights may fill the context with it
    if required.finish_reason == "tool_calls":
        assert required.message.tool_calls and required.message.content is None
        assert all(c.function.name in ("get_weather", "get_time") for c in required.message.tool_calls)
    else:
        assert required.finish_reason == "length" and required.message.content.startswith("[{")
    tokens = eng.tokenizer(bodies["bias"].choices[0].message.content, add_special_tokens=False)["input_ids"]
    assert tokens and set(tokens) == {77}  # +100 on one token: greedy picks nothing else
    rest = bodies["rest-of-context"]
    assert rest.usage.completion_tokens > 16 or rest.choices[0].finish_reason == "stop"
    c_lp = bodies["c-lp"].choices[0].logprobs  # top-3 plus the sampled token when it ranks lower (as vLLM)
    assert len(c_lp.tokens) == 5 and all(3 <= len(top) <= 4 for top in c_lp.top_logprobs)
    assert c_lp.text_offset == sorted(c_lp.text_offset) and c_lp.text_offset[-1] <= len(bodies["c-lp"].choices[0].text)
    assert bodies["c-ids"].usage.prompt_tokens == 4
    state = batch.status("everything", client=client).to_dict()
    parsed = Batch.model_validate(state)
    assert parsed.status == "completed" and parsed.request_counts.completed == len(EVERYTHING)
    assert parsed.endpoint == "/v1/chat/completions" and isinstance(parsed.created_at, int)


def test_cached_tokens_report_prefix_cache_hits(tiny_llama, redis_url):
    eng = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=4)
    client = Client(redis_url)
    prompt = "the same long preamble of many words " * 6
    with running_worker(eng, redis_url):
        first = client.result(client.enqueue(prompt, max_tokens=2), timeout=60)
        second = client.result(client.enqueue(prompt, max_tokens=2), timeout=60)
    assert first.usage.cached_tokens == 0
    assert 0 < second.usage.cached_tokens < second.usage.prompt_tokens
    assert second.usage.cached_tokens % 8 == 0  # whole blocks
