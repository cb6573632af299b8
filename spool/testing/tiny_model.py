"""Tiny random-init checkpoints for tests, the demo and benchmarks: real HF directories, made offline.

A byte-level BPE tokenizer trained on a built-in corpus (with a chat template) plus a small Llama-family
model with random weights, saved as config.json + model.safetensors + tokenizer files.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
import transformers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
# Order fixes the ids: 0..5, before the 256 byte symbols.
SPECIAL_TOKENS = [BOS, EOS, PAD, *CHAT_MARKERS]

# Markers are spelled out literally so the tokenizer matches them as its added tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Qwen-style: no BOS anywhere (the template renders none, encode() adds none), Hermes tool calls, and
# Qwen3's enable_thinking switch (a chat_template_kwargs variable).
QWEN_CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|system|>\nTools:\n<tools>\n' }}{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}"
    "{% endfor %}{{ '</tools>' + eos_token + '\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'tool' %}"
    "{{ '<|user|>\n<tool_response>\n' + message['content'] + '\n</tool_response>' + eos_token + '\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + (message['content'] or '') }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>\n' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '\n</tool_call>' }}{% endfor %}"
    "{% if not (loop.last and continue_final_message) %}{{ eos_token + '\n' }}{% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n' }}{% endif %}"
    "{% endif %}"
)

_WORDS = (
    "the a an of to and in is it that for on with as was at by be this from or have not are but "
    "one all were when we there can which their said if will each about how up out them then she "
    "many some so these would other into has more her two like him see time could no make than "
    "first been its who now people my made over did down only way find use may water long little "
    "very after words called just where most know get through back much before go good new write "
    "our used me man too any day same right look think also around another came come work three "
    "word must because does part even place well such here take why things help put years different "
    "away again off went old number great tell men say small every found still between name should "
    "home big give air line set own under read last never us left end along while might next sound "
    "below saw something thought both few those always looked show large often together asked house "
    "world going want school important until form food keep children feet land side without boy once "
    "engine token stream queue worker request batch model cache block kernel prompt sample"
).split()
# Multi-byte text so that characters are split across tokens: accents, CJK, emoji (with ZWJ and skin tones).
_NON_ASCII = (
    "café naïve résumé über Straße façade señor crème brûlée Ålesund Øre jalapeño coöperate "
    "日本語 東京 中文 你好世界 漢字 こんにちは カタカナ 한국어 Здравствуйте мир Ελληνικά "
    "🙂 🚀 👍🏽 👨‍👩‍👧 🎉 ✨ ❤️ 🇫🇷 € £ ¥ — “quoted” ‘single’ … ½ ≤ ≥ ∑ π"
).split()
_PUNCT = (".", ",", "!", "?", ";", ":", "...")


def _corpus(num_lines: int = 400, seed: int = 1234) -> list[str]:
    """Deterministic English-like lines with numbers, code-ish bits and non-ASCII words mixed in."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        words = []
        for _ in range(rng.randint(4, 16)):
            r = rng.random()
            if r < 0.12:
                words.append(rng.choice(_NON_ASCII))
            elif r < 0.16:
                words.append(str(rng.randint(0, 10_000)))
            else:
                w = rng.choice(_WORDS)
                words.append(w.capitalize() if not words or rng.random() < 0.05 else w)
        line = " ".join(words) + rng.choice(_PUNCT)
        if i % 25 == 0:
            line = f"def f_{i}(x):\n    return x * {i} + 1  # {line}"
        if i % 40 == 0:
            line = " ".join(_NON_ASCII[i // 40 :: 3])  # every non-ASCII word appears at least once
        lines.append(line)
    return lines


def build_tokenizer(path: str | Path, vocab_size: int = 512, style: str = "llama") -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer, save it to `path` (AutoTokenizer-loadable offline), return it.

    style "llama": encode() prepends BOS and the chat template renders `{{ bos_token }}` too (Llama 3,
    Mistral); "qwen": no BOS at all, Hermes `<tool_call>` tool calls and an enable_thinking switch.
    """
    tok = Tokenizer(models.BPE())
    # Byte-level everything: any string encodes, and decode is the exact inverse on text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Llama-style: encode() prepends BOS; trim_offsets=False keeps offsets over the raw bytes.
    bos_id = tok.token_to_id(BOS)
    steps = [processors.ByteLevel(trim_offsets=False)]
    if style == "llama":
        steps.append(processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                   special_tokens=[(BOS, bos_id)]))
    elif style != "qwen":
        raise ValueError(f"unknown tokenizer style {style!r}")
    tok.post_processor = processors.Sequence(steps)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(CHAT_MARKERS),
        chat_template=CHAT_TEMPLATE if style == "llama" else QWEN_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.save_pretrained(str(path))
    return fast


VOCAB = 512
ARCHES = ("llama", "qwen2", "qwen3", "mistral")


def _config(arch: str, tokenizer, tie: bool, hidden_size: int, num_layers: int, overrides: dict | None = None):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=0.2,  # peaked logits: greedy comparisons are not decided by rounding noise
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    common.update(overrides or {})  # e.g. other head counts, a vocabulary padded past the tokenizer's
    if arch == "llama":
        return transformers.LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        return transformers.Qwen3Config(**{"head_dim": 16, **common})
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    raise ValueError(arch)


def build_tiny_model(
    path: str | Path, arch: str = "llama", tie: bool = False, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
    tokenizer_style: str = "llama", config_overrides: dict | None = None,
) -> Path:
    """Save a tiny random-init `arch` model with a trained BPE tokenizer (build_tokenizer's style) to `path`;
    config_overrides replace transformers config fields (num_attention_heads, head_dim, vocab_size, ...)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path, style=tokenizer_style)
    cfg = _config(arch, tok, tie, hidden_size, num_layers, config_overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # non-trivial norm weights, so a skipped norm shows up
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return path
