"""A Hugging Face fast tokenizer built from a tiktoken rank file (Llama 3's tokenizer.model), for bench shapes.

Dummy-weight shapes have no checkpoint, but the grammar mask's cost depends on the real vocabulary. Meta
ships Llama 3's vocabulary as a tiktoken rank file (github.com/meta-llama/llama-models,
models/llama3/tokenizer.model: lines "base64(token bytes) rank"); its licence keeps it out of this repository,
so it is read from where the user put it (`--tokenizer-file`, e.g. .vocab/llama3.tiktoken, git-excluded).

The conversion is the standard one (transformers' TikTokenConverter does the same): a byte-level BPE whose
token id is the rank, and one merge (left, right) for every way a token splits into two tokens, ordered by
the rank of the token they make. tiktoken merges, within a pre-token, the adjacent pair whose concatenation
has the lowest rank; ordering merges by that rank makes the BPE pick the same pair, and `ignore_merges`
keeps a pre-token that is itself a token whole, as tiktoken does. Pre-tokenization is Llama 3's regex, and
the 256 special tokens follow the ranks in Meta's layout (llama-models' tokenizer.py).
"""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
# Ids rank_count + i: begin_of_text and end_of_text first (bos, eos), 256 in all.
LLAMA3_SPECIALS = _LLAMA3_NAMED + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_LLAMA3_NAMED))]
_BUILD_VERSION = "1"  # part of the cache key: bump when the built tokenizer changes


def read_ranks(path: Path) -> dict[bytes, int]:
    """token bytes -> rank from a tiktoken file; ranks must be 0..N-1 (they become the token ids)."""
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}, one per token")
    return ranks


def byte_symbols() -> list[str]:
    """The byte-level alphabet: symbol of byte b (GPT-2's map: printable bytes stand for themselves)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in kept:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE's vocabulary (byte-level symbols -> id = rank) and merges, ordered by the rank they produce."""
    sym = byte_symbols()

    def text(b: bytes) -> str:
        return "".join(sym[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                merges.append((rank, left_rank, right_rank, left, right))
    merges.sort()
    return vocab, [(text(left), text(right)) for _, _, _, left, right in merges]


def build_tiktoken_tokenizer(path: Path, rank_file: Path, specials: list[str] | None = None,
                             pattern: str = LLAMA3_PATTERN) -> PreTrainedTokenizerFast:
    """Save an AutoTokenizer-loadable tokenizer (ranks, then `specials`; bos/eos the first two) and return it."""
    specials = LLAMA3_SPECIALS if specials is None else specials
    vocab, merges = vocab_and_merges(read_ranks(rank_file))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos, eos = specials[0], specials[1]
    bos_id = len(vocab)
    # Llama 3's post-processor: bos before a prompt (add_special_tokens=True), nothing else.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, bos_id)]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   clean_up_tokenization_spaces=False, model_max_length=131072)
    fast.save_pretrained(str(path))
    return fast


def file_digest(path: Path) -> str:
    """sha256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_tokenizer_dir(rank_file: Path, cache_root: Path | None = None) -> Path:
    """A directory holding the tokenizer of `rank_file`, built once per file content (keyed by its sha256)."""
    root = Path(cache_root or os.environ.get("SPOOL_BENCH_CACHE") or Path(tempfile.gettempdir()) / "spool-bench")
    final = root / "tokenizers" / f"{file_digest(rank_file)[:24]}-v{_BUILD_VERSION}"
    if (final / "tokenizer.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        build_tiktoken_tokenizer(staging, rank_file)
        try:
            staging.rename(final)  # atomic: a concurrent builder's finished copy wins, this one is dropped
        except OSError:
            if not (final / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def copy_tokenizer(rank_file: Path, dest: Path) -> int:
    """Put the rank file's tokenizer files into `dest` (a model directory); returns its vocabulary size."""
    src = cached_tokenizer_dir(rank_file)
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, dest / f.name)
    return len(read_ranks(rank_file)) + len(LLAMA3_SPECIALS)
