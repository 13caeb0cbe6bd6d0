"""A built-in byte-level tokenizer for the presets (no files, no hub)."""

from __future__ import annotations

from collections.abc import Iterable


class ByteTokenizer:
    """Ids 0 pad, 1 bos, 2 eos; byte ``b`` is id ``b + 3`` (vocab 259).

    ``encode`` adds no special tokens. ``decode`` skips specials and any id outside the byte
    range (a preset's vocab may be larger than 259), and replaces invalid UTF-8.
    """

    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    _offset: int = 3
    vocab_size: int = 256 + _offset

    def encode(self, text: str) -> list[int]:
        return [b + self._offset for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i - self._offset for i in map(int, ids) if self._offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")
