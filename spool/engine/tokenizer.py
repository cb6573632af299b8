"""Tokenizer loading from a local directory only (no hub access, ever)."""
from __future__ import annotations

from pathlib import Path

from spool.engine.config import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: str | Path, required: bool = True):
    """AutoTokenizer from a local directory; None when absent and not required (dummy-weight benchmarks)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        if required:
            raise ConfigError(f"{path} has no tokenizer: expected one of {', '.join(TOKENIZER_FILES)}")
        return None
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
