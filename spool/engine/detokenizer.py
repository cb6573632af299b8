"""Incremental detokenization: growing token ids to UTF-8-safe text deltas, with stop-string detection.

Technique (vLLM / HF DecodeStream "prefix offset"): keep a short window of recent token ids, decode only
the window each step and emit what lies past the text already taken from it. Decoders are stable under
appending, except for a trailing incomplete character, which shows as U+FFFD until its bytes arrive, so
a trailing run of U+FFFD is held back. Unlike the classic algorithm, text before that run is emitted
right away and the window slides even while a partial character is pending, so a model that emits
invalid bytes for a long stretch never grows the window (every step stays O(window), not O(output)).

Byte-level BPE fast path (Llama 3, Qwen, GPT-2 style: the backend's decoder is ByteLevel): such a decode is the
bytes of each token, concatenated, then decoded as UTF-8 with U+FFFD for invalid sequences. A token whose own
decode is non-empty valid text (`_token_pieces`) begins on a character boundary, so decoding the window plus
that token gives the window's text plus the token's text; while nothing is pending, add_tokens appends such
pieces without calling the tokenizer, and sliding the window over them needs no decode either. Any other token
(an added or special token, invalid UTF-8) takes the general path above. A character split over tokens is
fast too when its bytes are valid UTF-8: the token that starts it (a valid but incomplete UTF-8 prefix) holds
one U+FFFD as the general path would, and the token that completes it appends the decoded bytes. The outputs
are identical.

Known, inherent differences from `tokenizer.decode(output_ids)`:
- The last few prompt tokens seed the window (as in vLLM), so the first output token keeps its leading
  space under SentencePiece/Metaspace decoders, which strip it at the start of a decode.
- A prompt ending mid-character: bytes that complete it belong to the prompt's character, not the output.
- `clean_up_tokenization_spaces` (a whole-string rewrite; transformers 5 already skips it for BPE) is
  not applied. Byte-level BPE tokenizers match `decode` exactly.
"""
from __future__ import annotations

import codecs
import weakref
from collections.abc import Sequence

REPLACEMENT = "\ufffd"
# Longest run of trailing U+FFFD that more bytes could still turn into one character: an incomplete
# UTF-8 sequence is at most 3 bytes, and byte-fallback decoders print one U+FFFD per pending byte.
_MAX_PENDING_CHARS = 3
# Prompt tokens that seed the window, and how far the window shrinks back when it slides.
_CONTEXT = 5
# Sliding costs one extra decode, so the window is let grow to this length before it slides back.
_SLIDE_AT = 12
# While a partial character is pending, slide back to a wider window so that the held tail decodes
# the same way in it (its bytes span at most 3 chars x 4 bytes, plus 3 bytes of leading garbage).
_CONTEXT_PENDING = 16


# Per tokenizer object: computing the special ids walks all added tokens, too slow to redo per request.
_SPECIAL_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _special_ids(tokenizer) -> frozenset[int]:
    """Ids that skip_special_tokens removes: the backend's own flags where there is one."""
    try:
        return _SPECIAL_IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
    else:
        ids = frozenset(getattr(tokenizer, "all_special_ids", ()))
    try:
        _SPECIAL_IDS[tokenizer] = ids
    except TypeError:
        pass  # not weak-referenceable: just don't cache
    return ids


def _decode_fn(tokenizer, skip_special_tokens: bool):
    """A function ids -> text, straight to the Rust tokenizer when there is one (no Python-side cleanup)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


# Per tokenizer object, and skip_special_tokens: id -> its text when the fast path may append it, else None.
_PIECES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_byte_level(tokenizer) -> bool:
    """True when the backend's decoder is exactly ByteLevel (per-token bytes, concatenated, decoded as UTF-8)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and type(decoder).__name__ == "ByteLevel"


def _token_pieces(tokenizer, skip_special_tokens: bool) -> "_Pieces | None":
    """The shared per-token text cache of a byte-level tokenizer (None for any other decoder)."""
    try:
        by_skip = _PIECES[tokenizer]
    except KeyError:
        by_skip = {}
        try:
            _PIECES[tokenizer] = by_skip
        except TypeError:
            pass
    except TypeError:
        by_skip = {}
    if skip_special_tokens not in by_skip:
        by_skip[skip_special_tokens] = _Pieces(tokenizer, skip_special_tokens) if _is_byte_level(tokenizer) else None
    return by_skip[skip_special_tokens]


class _Pieces(dict):
    """id -> the token's text when it may be appended to a byte-level window as is, else None; filled on first
    sight of each id (one decode call each). Added tokens (special or not) are never fast: their decode goes
    through the added vocabulary, not the byte-level model."""

    def __init__(self, tokenizer, skip_special_tokens: bool):
        super().__init__()
        self._decode = _decode_fn(tokenizer, skip_special_tokens)
        self._added = frozenset(tokenizer.backend_tokenizer.get_added_tokens_decoder())

        self._to_token = tokenizer.backend_tokenizer.id_to_token
        self._raw: dict[int, bytes | None] = {}

    def __missing__(self, token: int) -> str | None:
        piece = None
        if token not in self._added:
            text = self._decode([token])
            if text and REPLACEMENT not in text:  # a whole, valid UTF-8 string on its own
                piece = text
        self[token] = piece
        return piece

    def raw(self, token: int) -> bytes | None:
        """The token's bytes as the ByteLevel decoder makes them (None for an added token)."""
        try:
            return self._raw[token]
        except KeyError:
            pass
        data = None
        if token not in self._added:
            name = self._to_token(token)
            if name is not None:
                # As the decoder: each symbol of the byte-level alphabet is one byte; a token with any other
                # character is its UTF-8 as is.
                try:
                    data = bytes(_BYTE_OF[c] for c in name)
                except KeyError:
                    data = name.encode()
        self._raw[token] = data
        return data


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, reversed: the byte-level alphabet's symbol -> its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[chr(b)] = b
        else:
            symbols[chr(256 + extra)] = b
            extra += 1
    return symbols


_BYTE_OF = _byte_level_alphabet()


# UTF-8 lead byte -> (continuation bytes it needs, the allowed range of the first one) (Unicode Table 3-7).
_LEADS = {**{b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)}, 0xE0: (2, 0xA0, 0xBF),
          **{b: (2, 0x80, 0xBF) for b in range(0xE1, 0xF0)}, 0xED: (2, 0x80, 0x9F), 0xF0: (3, 0x90, 0xBF),
          **{b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)}, 0xF4: (3, 0x80, 0x8F)}


def _is_incomplete_utf8(data: bytes) -> bool:
    """data is the start of one UTF-8 character, valid so far, without its last byte(s): what a lossy decoder
    (the tokenizer's, and Python's) shows as one U+FFFD at the end of its input."""
    lead = _LEADS.get(data[0]) if data else None
    if lead is None or len(data) > lead[0]:
        return False
    if len(data) > 1 and not lead[1] <= data[1] <= lead[2]:
        return False
    return all(0x80 <= c <= 0xBF for c in data[2:])


def _pending_len(text: str) -> int:
    """How many trailing characters of a window's text may still change when more tokens arrive."""
    n = 0
    while n < _MAX_PENDING_CHARS and n < len(text) and text[-1 - n] == REPLACEMENT:
        n += 1
    return n


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, UTF-8 safe."""

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ):
        self._decode = _decode_fn(tokenizer, skip_special_tokens)
        # Skipped ids never enter the window: they add no text, and every window token then carries
        # text, which the window sizes above rely on.
        self._skip = _special_ids(tokenizer) if skip_special_tokens else frozenset()
        # Only the window is kept: ids[0] is the window start, and the first `_taken` characters of
        # decode(ids) are already in output_text (or belong to the prompt).
        self._ids: list[int] = []
        for t in reversed(prompt_token_ids):  # from the end: prompts can be long
            if len(self._ids) == _CONTEXT:
                break
            if t not in self._skip:
                self._ids.append(t)
        self._ids.reverse()
        self._taken = len(self._decode(self._ids)) if self._ids else 0
        self._wlen = self._taken  # len(decode(self._ids)): the window's whole text
        self._pieces = _token_pieces(tokenizer, skip_special_tokens)  # byte-level fast path (or None)
        self._stop = [s for s in stop if s]
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._include_stop = include_stop_str_in_output
        self._pending = ""  # held-back tail of the window text (a partial character, shown as U+FFFD)
        self._head: bytes | None = None  # byte-level fast path: the bytes of the pending character (one U+FFFD)
        self._emitted = 0  # characters of output_text already returned by get_delta
        self.stopped: str | None = None  # the stop string that ended the text, once one has
        self.output_text = ""

    def add_tokens(self, token_ids: Sequence[int], check_stop: bool = True) -> str | None:
        """Append generated ids; return the stop string that now ends output_text, if one does."""
        if not self._skip.isdisjoint(token_ids):
            token_ids = [t for t in token_ids if t not in self._skip]
        if self.stopped is not None or not token_ids:
            return None  # text after a stop string is never shown; skipped ids change nothing
        pieces = self._pieces
        if pieces is not None and not self._pending and self._wlen == self._taken:
            parts = [pieces[t] for t in token_ids]
            if None not in parts:
                return self._append_pieces(token_ids, "".join(parts), check_stop)
        old_len = len(self.output_text)
        self._ids.extend(token_ids)
        self._head = None  # the general path from here: the fast path's pending bytes are no longer tracked
        text = self._decode(self._ids)
        self._wlen = len(text)
        pending = _pending_len(text)
        end = len(text) - pending
        if end > self._taken:
            self.output_text += text[self._taken:end]
            self._taken = end
        self._pending = text[self._taken:]
        if len(self._ids) > _SLIDE_AT:
            self._slide()
        if check_stop and self._stop and len(self.output_text) > old_len:
            return self._check_stop(old_len)
        return None

    def add_token(self, token: int, check_stop: bool = True) -> str | None:
        """add_tokens([token]); on the byte-level fast path without building a list (the engine's per-step call)."""
        pieces = self._pieces
        if (pieces is not None and not self._pending and self._wlen == self._taken and self.stopped is None
                and token not in self._skip):
            piece = pieces[token]
            if piece is not None:
                return self._append_pieces((token,), piece, check_stop)
        if pieces is not None and self.stopped is None and token not in self._skip:
            old_len = len(self.output_text)
            added = self._split_char(token)
            if added is not None:
                return self._check_stop(old_len) if added and check_stop and self._stop else None
        return self.add_tokens([token], check_stop)

    def add_token_delta(self, token: int, check_stop: bool = True) -> str:
        """add_token(token, check_stop) then get_delta(False): the text this token lets out (the whole-token fast
        path inlined, the rest through add_token). Whether a stop string ended the text shows in `stopped` (then
        the rest comes from get_delta(True))."""
        pieces = self._pieces
        if (pieces is not None and not self._pending and self._wlen == self._taken and self.stopped is None
                and token not in self._skip):
            piece = pieces[token]
            if piece is not None:  # the byte-level fast path, as _append_pieces
                text = self.output_text
                old_len = len(text)
                self._ids.append(token)
                self.output_text = text = text + piece
                self._taken = self._wlen = self._wlen + len(piece)
                if len(self._ids) > _SLIDE_AT:
                    self._slide()
                if not self._stop and self._emitted == old_len:  # nothing held back: the delta is the piece
                    self._emitted = len(text)
                    return piece
                if check_stop and self._stop:
                    self._check_stop(old_len)
                return self.get_delta(False)
        self.add_token(token, check_stop)  # a character split over tokens, or the general path
        return self.get_delta(False)

    def _split_char(self, token: int) -> str | None:
        """The byte-level fast path for characters split over tokens (module docstring): the text this token adds
        to output_text ("" when it only starts or continues a character), or None, with nothing changed, when the
        general path must decide (invalid UTF-8, or not the state the fast path leaves)."""
        pieces = self._pieces
        data = pieces.raw(token)
        if data is None:
            return None
        if self._head is None:
            if self._pending or self._wlen != self._taken:
                return None
        elif self._pending == REPLACEMENT and self._wlen == self._taken + 1:
            data = self._head + data  # the pending character's bytes come first
        else:
            return None
        try:
            # The whole characters, strictly; an incomplete one at the end is left (final=False).
            text, used = codecs.utf_8_decode(data, "strict", False)
        except UnicodeDecodeError:
            return None
        tail = data[used:]
        if (tail and not _is_incomplete_utf8(tail)) or REPLACEMENT in text or not data:
            return None
        # data starts a character and is valid UTF-8 up to an incomplete last one: the window decodes to its
        # text before data, then `text`, then one U+FFFD (held back) if a character is still incomplete.
        self._ids.append(token)
        if text:
            self.output_text += text
            self._taken += len(text)
        self._head = tail or None
        self._pending = REPLACEMENT if tail else ""
        self._wlen = self._taken + (1 if tail else 0)
        if len(self._ids) > _SLIDE_AT:
            self._slide()
        return text

    def _append_pieces(self, token_ids: Sequence[int], added: str, check_stop: bool) -> str | None:
        """The byte-level fast path (module docstring): nothing is pending and the window's text is all taken, so
        the window plus these tokens decodes to its text plus `added`, their pieces joined."""
        old_len = len(self.output_text)
        self._ids.extend(token_ids)
        self.output_text += added
        self._taken = self._wlen = self._wlen + len(added)
        if len(self._ids) > _SLIDE_AT:
            self._slide()
        if check_stop and self._stop:
            return self._check_stop(old_len)
        return None

    def _slide(self) -> None:
        """Drop old ids from the window, re-anchoring `_taken` in the shorter window's text."""
        keep = _CONTEXT_PENDING if self._pending else _CONTEXT
        if len(self._ids) <= keep:
            return
        ids = self._ids[-keep:]
        pieces = self._pieces
        if pieces is not None and not self._pending:
            parts = [pieces[t] for t in ids]
            if None not in parts:  # the shorter window's text is its pieces' (module docstring): no decode
                self._ids = ids
                self._taken = self._wlen = sum(map(len, parts))
                return
        text = self._decode(ids)
        # Valid only if the shorter window ends with the same held tail, held by the same rule;
        # otherwise keep the long window one more step (correctness over speed).
        if _pending_len(text) != len(self._pending) or not text.endswith(self._pending):
            return
        if len(text) < len(self._pending):
            return
        self._ids = ids
        self._wlen = len(text)
        self._taken = len(text) - len(self._pending)

    def _check_stop(self, old_len: int) -> str | None:
        """Find the stop string that completes first in the new text; truncate output_text at it."""
        text = self.output_text
        # A match must end in the new text, so it starts at most max_stop_len - 1 characters before it.
        start = max(0, old_len - self._max_stop_len + 1)
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for s in self._stop:
            i = text.find(s, start)
            if i < 0:
                continue
            # Earliest end is what character-at-a-time generation would have stopped at, so the
            # result does not depend on how the text was split into tokens; ties go to the longer one.
            key = (i + len(s), i, s)
            if best is None or key[:2] < best[:2]:
                best = key
        if best is None:
            return None
        end, i, s = best
        self.output_text = text[:end] if self._include_stop else text[:i]
        self._pending, self._head = "", None
        self.stopped = s
        # No un-emitting needed: get_delta held back the last max_stop_len - 1 characters, and the
        # match starts no earlier than that.
        return s

    def get_delta(self, finished: bool) -> str:
        """Text not yet returned; holds back a possible stop-string prefix and a partial character until finished."""
        if finished:
            if self._pending:
                # The sequence ended inside a character (or on real U+FFFD): show it as decode() does.
                # It is only U+FFFD, so it is not searched for stop strings.
                self.output_text += self._pending
                self._taken += len(self._pending)
                self._pending, self._head = "", None
            end = len(self.output_text)
        elif self.stopped is not None:
            end = len(self.output_text)  # nothing more can be appended, so nothing can start a stop string
        else:
            end = len(self.output_text) - max(self._max_stop_len - 1, 0)
        if end <= self._emitted:
            return ""
        delta = self.output_text[self._emitted:end]
        self._emitted = end
        return delta


def decode_logprob_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each id decoded on its own, special tokens shown (the `decoded_token` of a logprob)."""
    ids = list(ids)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # One call into Rust for all top-k ids of a position.
        return backend.decode_batch([[i] for i in ids], skip_special_tokens=False)
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def token_bytes_table(tokenizer) -> list[bytes]:
    """The exact bytes of every token id: byte-level BPE (GPT-2 style) and byte-fallback (<0xNN>) tokens are
    mapped back to their bytes, so a token that holds part of a UTF-8 character is not a U+FFFD."""
    import xgrammar  # decodes both vocabulary styles the way its grammar matcher needs them

    return list(xgrammar.TokenizerInfo.from_huggingface(tokenizer).decoded_vocab)
