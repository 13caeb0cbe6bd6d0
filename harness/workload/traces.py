"""Readers for request traces: Azure LLM inference (CSV), Mooncake (JSONL), BurstGPT (CSV) and
ShareGPT (JSON).

Each reader streams its file and returns drafts (arrival, lengths, prompt recipe) sorted by
arrival with the earliest at t=0, plus metadata (rows read, rows skipped and why). Rows need not
be in time order: they are sorted (stably) and the count of rows earlier than their predecessor
is reported as ``out_of_order_rows``. Any bad input raises ``WorkloadError`` naming the file, the
1-based line and the problem: missing file, empty file or no data rows, missing column (with the
header found), non-numeric field (column and value), a length below 1, bad JSON.

CSV traces carry lengths only, so their prompts are random ids (made later, seeded); Mooncake
prompts are built from ``hash_ids`` so that equal ids give equal token blocks (see
``block_prompt``), which makes prefix reuse in a KV cache real.
"""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .base import RequestDraft, WorkloadError
from .synthetic import token_range


@dataclass
class TraceRead:
    """A reader's result: drafts sorted by arrival (first at 0) and what was seen on the way."""

    rows: list[RequestDraft]
    metadata: dict[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# shared helpers


def _check_file(path: Path) -> None:
    if not path.exists():
        raise WorkloadError("file not found", str(path))
    if not path.is_file():
        raise WorkloadError("not a regular file", str(path))


def _number(value: object, name: str, path: Path, line: int) -> float:
    """``value`` as a finite float, or a WorkloadError naming the field and the value."""
    if isinstance(value, bool):  # JSON true/false would otherwise pass as 1/0
        raise WorkloadError(f"field {name!r} is not a number: {value!r}", str(path), line)
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise WorkloadError(f"field {name!r} is not a number: {value!r}", str(path), line) from None
    if not math.isfinite(x):
        raise WorkloadError(f"field {name!r} is not finite: {value!r}", str(path), line)
    return x


def _length(value: object, name: str, path: Path, line: int, minimum: int = 1) -> int:
    """A token count: an integral number >= ``minimum``."""
    x = _number(value, name, path, line)
    if not x.is_integer():
        raise WorkloadError(f"field {name!r} is not an integer: {value!r}", str(path), line)
    if x < minimum:
        raise WorkloadError(f"field {name!r} must be >= {minimum}, got {value!r}", str(path), line)
    return int(x)


def _finish(
    items: list[tuple[float, RequestDraft]], path: Path, last_line: int, meta: dict[str, object]
) -> TraceRead:
    """Sort by arrival (stable), re-base to the earliest, and record out-of-order rows."""
    if not items:
        raise WorkloadError("no data rows", str(path), last_line)
    times = [t for t, _ in items]
    meta["out_of_order_rows"] = sum(1 for a, b in itertools.pairwise(times) if b < a)
    order = sorted(range(len(items)), key=times.__getitem__)
    origin = times[order[0]]
    rows = [
        RequestDraft(
            times[i] - origin,
            items[i][1].input_len,
            items[i][1].output_len,
            items[i][1].source,
            items[i][1].prompt,
            items[i][1].hash_ids,
        )
        for i in order
    ]
    meta["rows"] = len(rows)
    return TraceRead(rows, meta)


def _csv_rows(
    path: Path, columns: Sequence[str]
) -> Iterator[tuple[int, dict[str, str]] | tuple[int, None]]:
    """Data rows of a CSV with a header, as ``(line, {column: text})`` for ``columns``; yields
    ``(last_line, None)`` once at the end so callers know where the file ended."""
    _check_file(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header: list[str] | None = None
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue  # blank lines (e.g. a trailing one) carry nothing
            if header is None:
                header = [cell.strip().lstrip("\ufeff") for cell in row]
                missing = [c for c in columns if c not in header]
                if missing:
                    raise WorkloadError(
                        f"missing column {missing[0]!r}; header has: {', '.join(header)}",
                        str(path),
                        line,
                    )
                index = {c: header.index(c) for c in columns}
                width = max(index.values()) + 1
                continue
            if len(row) < width:
                raise WorkloadError(
                    f"expected at least {width} fields, got {len(row)}", str(path), line
                )
            yield line, {c: row[i].strip() for c, i in index.items()}
        if header is None:
            raise WorkloadError("empty file: no header", str(path), 1)
        yield reader.line_num, None


# ---------------------------------------------------------------------------------------------
# Azure LLM inference trace (2023 and 2024 styles)

_TS = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:[.,](\d+))?\s*"
    r"(Z|[+-]\d{2}(?::?\d{2})?)?"
)


@lru_cache(maxsize=4096)
def _day(y: int, m: int, d: int) -> int:
    return dt.date(y, m, d).toordinal()


def parse_timestamp(text: str) -> tuple[int, float]:
    """``YYYY-MM-DD[ T]HH:MM:SS[.fraction][Z|±HH[:MM]]`` as (whole seconds, fraction) since an
    arbitrary epoch, in UTC (no zone: taken as UTC). Any number of fractional digits is kept
    (2023's trace has 7, which ``strptime`` rejects); seconds and fraction are returned apart so
    differences stay exact to the microsecond over long traces. ValueError if malformed."""
    m = _TS.fullmatch(text.strip())
    if m is None:
        raise ValueError(text)
    y, mo, d, hh, mm, ss = (int(m.group(i)) for i in range(1, 7))
    if hh > 23 or mm > 59 or ss > 60:
        raise ValueError(text)
    seconds = _day(y, mo, d) * 86400 + hh * 3600 + mm * 60 + ss
    zone = m.group(8)
    if zone and zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = int(digits[:2]) * 3600 + (int(digits[2:4]) * 60 if len(digits) > 2 else 0)
        seconds -= sign * offset
    frac = m.group(7)
    return seconds, (int(frac) / 10 ** len(frac) if frac else 0.0)


AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def read_azure(path: str | Path) -> TraceRead:
    """Azure LLM inference CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``); both lengths must
    be >= 1; arrival = seconds since the earliest timestamp."""
    path = Path(path)
    items: list[tuple[float, RequestDraft]] = []
    base: int | None = None
    for line, row in _csv_rows(path, AZURE_COLUMNS):
        if row is None:
            return _finish(items, path, line, {"format": "azure", "path": str(path)})
        try:
            sec, frac = parse_timestamp(row["TIMESTAMP"])
        except ValueError:
            raise WorkloadError(
                f"field 'TIMESTAMP' is not a timestamp: {row['TIMESTAMP']!r}", str(path), line
            ) from None
        if base is None:
            base = sec  # whole seconds kept apart from the float so long traces stay exact
        t = (sec - base) + frac
        draft = RequestDraft(
            0.0,
            _length(row["ContextTokens"], "ContextTokens", path, line),
            _length(row["GeneratedTokens"], "GeneratedTokens", path, line),
            source=f"{path.name}:{line}",
        )
        items.append((t, draft))
    raise AssertionError("unreachable")  # _csv_rows always ends with a None row


# ---------------------------------------------------------------------------------------------
# BurstGPT

BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens")


def read_burstgpt(path: str | Path, model: str | None = None) -> TraceRead:
    """BurstGPT CSV. Rows with 0 response tokens are failed requests: skipped, counted as
    ``failed_rows``; rows with 0 request tokens are skipped too (``zero_request_rows``), as no
    prompt can be built; negative counts are errors. ``model`` keeps only rows of that model
    (e.g. ``ChatGPT``, ``GPT-4``; others counted as ``other_model_rows``)."""
    path = Path(path)
    items: list[tuple[float, RequestDraft]] = []
    failed = zero_request = other_model = 0
    models: Counter[str] = Counter()
    for line, row in _csv_rows(path, BURSTGPT_COLUMNS):
        if row is None:
            meta: dict[str, object] = {
                "format": "burstgpt",
                "path": str(path),
                "model": model,
                "failed_rows": failed,
                "zero_request_rows": zero_request,
                "other_model_rows": other_model,
                "models": dict(models),
            }
            if not items and (failed or zero_request or other_model):
                raise WorkloadError(
                    f"no usable rows: {failed} failed, {zero_request} with 0 request tokens, "
                    f"{other_model} of other models than {model!r} (models: {dict(models)})",
                    str(path),
                    line,
                )
            return _finish(items, path, line, meta)
        t = _number(row["Timestamp"], "Timestamp", path, line)
        n_in = _length(row["Request tokens"], "Request tokens", path, line, minimum=0)
        n_out = _length(row["Response tokens"], "Response tokens", path, line, minimum=0)
        models[row["Model"]] += 1
        if model is not None and row["Model"] != model:
            other_model += 1
        elif n_out == 0:
            failed += 1
        elif n_in == 0:
            zero_request += 1
        else:
            items.append((t, RequestDraft(0.0, n_in, n_out, source=f"{path.name}:{line}")))
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Mooncake


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, object]] | tuple[int, None]]:
    """Objects of a JSONL file as ``(line, object)``; ``(last_line, None)`` at the end."""
    _check_file(path)
    line = 0
    with path.open(encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise WorkloadError(
                    f"bad JSON: {exc.msg} (column {exc.colno})", str(path), line
                ) from None
            if not isinstance(obj, dict):
                raise WorkloadError(
                    f"expected a JSON object, got {type(obj).__name__}", str(path), line
                )
            yield line, obj
    if line == 0:
        raise WorkloadError("empty file", str(path), 1)
    yield line, None


MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


def read_mooncake(path: str | Path, block_size: int = 512) -> TraceRead:
    """Mooncake JSONL: ``timestamp`` (ms), ``input_length``, ``output_length`` (both >= 1) and
    ``hash_ids`` (one id per ``block_size`` tokens; there must be enough ids to cover
    ``input_length``, extra ones are ignored)."""
    path = Path(path)
    if block_size < 1:
        raise WorkloadError(f"block_size must be >= 1, got {block_size}", str(path))
    items: list[tuple[float, RequestDraft]] = []
    for line, obj in _json_lines(path):
        if obj is None:
            meta = {"format": "mooncake", "path": str(path), "block_size": block_size}
            return _finish(items, path, line, meta)
        missing = [k for k in MOONCAKE_FIELDS if k not in obj]
        if missing:
            raise WorkloadError(
                f"missing field {missing[0]!r}; object has: {', '.join(obj)}", str(path), line
            )
        t = _number(obj["timestamp"], "timestamp", path, line) / 1000.0
        n_in = _length(obj["input_length"], "input_length", path, line)
        n_out = _length(obj["output_length"], "output_length", path, line)
        ids = obj["hash_ids"]
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and -(2**63) <= i < 2**63 for i in ids
        ):
            raise WorkloadError(
                f"field 'hash_ids' must be a list of 64-bit integers, got {str(ids)[:80]}",
                str(path),
                line,
            )
        need = -(-n_in // block_size)
        if len(ids) < need:
            raise WorkloadError(
                f"input_length {n_in} needs {need} blocks of {block_size} tokens but hash_ids "
                f"has {len(ids)}",
                str(path),
                line,
            )
        draft = RequestDraft(
            0.0, n_in, n_out, source=f"{path.name}:{line}", hash_ids=tuple(ids[:need])
        )
        items.append((t, draft))
    raise AssertionError("unreachable")


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a fast, well-mixed hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def block_prompt(
    hash_ids: Sequence[int], input_len: int, block_size: int, vocab_size: int, seed: int
) -> np.ndarray:
    """The prompt of a Mooncake request: block ``k`` holds the tokens of id ``hash_ids[k]``, the
    last one truncated so the prompt has exactly ``input_len`` tokens.

    An id's block is a counter-based stream keyed by (seed, id): token ``j`` of the block is
    hash(hash(seed, id) + j). So equal ids give equal tokens wherever they appear, in any
    request, and a truncated block is a prefix of the full one.
    """
    low, high = token_range(vocab_size)
    need = -(-input_len // block_size)
    ids = np.asarray(hash_ids[:need], dtype=np.int64).view(np.uint64)
    seed_key = _splitmix64(np.asarray([seed], dtype=np.int64).view(np.uint64))
    keys = _splitmix64(ids ^ seed_key)
    pos = np.arange(input_len, dtype=np.uint64)
    block = (pos // np.uint64(block_size)).astype(np.int64)
    x = _splitmix64(keys[block] + pos % np.uint64(block_size))
    return (x % np.uint64(high - low)).astype(np.int64) + low


# ---------------------------------------------------------------------------------------------
# ShareGPT


def _json_array(path: Path) -> Iterator[tuple[int, object]]:
    """Elements of a top-level JSON array with the line each starts on, decoded one at a time
    (so an error names the line where it is, and a reader wanting N entries stops early)."""
    _check_file(path)
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end()
    if pos == len(text):
        raise WorkloadError("empty file", str(path), 1)

    def bad(at: int, msg: str) -> WorkloadError:
        return WorkloadError(f"bad JSON: {msg}", str(path), 1 + text.count("\n", 0, at))

    if text[pos] != "[":
        raise bad(pos, "expected a JSON array of conversations")
    pos = ws.match(text, pos + 1).end()
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line = 1 + text.count("\n", 0, pos)
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise WorkloadError(
                f"bad JSON: {exc.msg} (column {exc.colno})", str(path), exc.lineno
            ) from None
        yield line, obj
        pos = ws.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos = ws.match(text, pos + 1).end()
        elif pos < len(text) and text[pos] == "]":
            return
        else:
            raise bad(pos, "expected ',' or ']' after an array element")


def read_sharegpt(
    path: str | Path, tokenizer: object | None, num_requests: int | None = None
) -> TraceRead:
    """ShareGPT JSON: per conversation, the first human turn directly followed by a gpt turn;
    prompt = ``tokenizer.encode(human)``, output length = ``len(tokenizer.encode(gpt))``. Taken in
    file order, stopping after ``num_requests``; conversations without such a pair, or whose
    prompt or answer encodes to nothing, are skipped and counted. Arrival times are all 0 (the
    workload synthesises them)."""
    path = Path(path)
    encode: Callable[[str], Sequence[int]] | None = getattr(tokenizer, "encode", None)
    if encode is None:
        raise WorkloadError(
            "sharegpt needs a tokenizer (with .encode) to measure lengths", str(path)
        )
    items: list[tuple[float, RequestDraft]] = []
    no_pair = empty = 0
    last = 1
    for line, entry in _json_array(path):
        last = line
        if not isinstance(entry, dict):
            raise WorkloadError(
                f"expected a conversation object, got {type(entry).__name__}", str(path), line
            )
        if "conversations" not in entry:
            raise WorkloadError(
                f"missing field 'conversations'; object has: {', '.join(entry)}", str(path), line
            )
        turns = entry["conversations"]
        if not isinstance(turns, list):
            raise WorkloadError("field 'conversations' must be a list", str(path), line)
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise WorkloadError(
                    f"turn {k} of conversation {entry.get('id')!r} needs 'from' and a string "
                    f"'value', got {str(turn)[:80]}",
                    str(path),
                    line,
                )
        pair = next(
            (
                (a["value"], b["value"])
                for a, b in itertools.pairwise(turns)
                if a.get("from") == "human" and b.get("from") == "gpt"
            ),
            None,
        )
        if pair is None:
            no_pair += 1
            continue
        prompt = tuple(int(i) for i in encode(pair[0]))
        n_out = len(encode(pair[1]))
        if not prompt or n_out == 0:
            empty += 1
            continue
        source = f"{path.name}:{line}"
        items.append((0.0, RequestDraft(0.0, len(prompt), n_out, source, prompt=prompt)))
        if num_requests is not None and len(items) >= num_requests:
            break  # stop decoding and tokenizing: the rest is not wanted
    meta = {"format": "sharegpt", "path": str(path), "no_pair_rows": no_pair, "empty_rows": empty}
    return _finish(items, path, last, meta)


# ---------------------------------------------------------------------------------------------


def read_trace_rows(path: str | Path) -> TraceRead:
    """Lengths-only reading with the format guessed from the file: ``.jsonl`` is Mooncake; a CSV
    is Azure or BurstGPT by its header. (ShareGPT needs a tokenizer: use ``read_sharegpt``.)"""
    path = Path(path)
    if path.suffix == ".jsonl":
        return read_mooncake(path)
    _check_file(path)
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    header = [c.strip().lstrip("\ufeff") for c in first.split(",")]
    if "ContextTokens" in header:
        return read_azure(path)
    if "Request tokens" in header:
        return read_burstgpt(path)
    raise WorkloadError(
        "cannot tell the trace format: expected a Mooncake .jsonl, or a CSV with an Azure "
        f"(ContextTokens) or BurstGPT (Request tokens) header; header has: {', '.join(header)}",
        str(path),
        1,
    )
