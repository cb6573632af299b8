"""A byte-level BPE tokenizer of any vocabulary size, built without training, for dummy-weight bench shapes.

Real checkpoints cannot be downloaded here, yet structured outputs (xgrammar) and detokenization need a tokenizer
whose vocabulary matches the model's. This one covers every byte (so any text encodes) and fills the rest of the
vocabulary with 2- and 3-byte tokens, with the merges that make them reachable; special tokens sit at the ids the
shape's config names (bos/eos), the rest of the tail is reserved specials, as Llama 3 and Qwen lay them out.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


def _regular_tokens(count: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """`count` tokens: the 256 byte symbols, then pairs, then triples (each reachable by one merge)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 symbols, one per byte
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= count:
                return vocab, merges
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    for a in alphabet:
        for b in alphabet:
            for c in alphabet:
                if len(vocab) >= count:
                    return vocab, merges
                vocab[a + b + c] = len(vocab)
                merges.append((a + b, c))
    raise ValueError(f"vocab_size {count} is larger than this scheme can fill")


def build_synthetic_tokenizer(path: Path, vocab_size: int, bos_id: int, eos_id: int) -> PreTrainedTokenizerFast:
    """Save an AutoTokenizer-loadable tokenizer of exactly `vocab_size` tokens to `path` and return it."""
    first_special = min(bos_id, eos_id)
    vocab, merges = _regular_tokens(first_special)
    specials = [f"<|reserved_special_token_{i}|>" for i in range(vocab_size - first_special)]
    specials[bos_id - first_special] = "<|begin_of_text|>"
    specials[eos_id - first_special] = "<|end_of_text|>"
    for i, name in enumerate(specials):
        vocab[name] = first_special + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(path))
    return fast
