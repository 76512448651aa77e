"""Uploaded bytes -> a DataFrame: compression, encoding, delimiter, header, missing values.

The file is streamed in chunks, never held whole: memory is bounded by the row limit (a
uniform, seeded sample of the rows when a file has more) plus one chunk. What was decided
(encoding, delimiter, header, sampling) is returned as notes for the profile.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import gzip
import io
import zlib
from typing import BinaryIO, Callable

import numpy as np
import pandas as pd

from bucketml import settings
from bucketml.contracts.rejections import Rejection

MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?", "-", "--", "nil", "#n/a"})
DELIMITERS = ",;\t|"
HEAD_BYTES = 1 << 20  # what encoding, delimiter and header are decided from
CHUNK_ROWS = 50_000
SEED = 42


@dataclasses.dataclass(frozen=True)
class Limits:
    """Upload limits; each can be set by an environment variable (docs/datasets.md)."""

    max_upload_bytes: int = 2 << 30  # BUCKETML_MAX_UPLOAD_BYTES: the object as stored
    max_text_bytes: int = 8 << 30  # BUCKETML_MAX_TEXT_BYTES: after decompression
    max_columns: int = 2000  # BUCKETML_MAX_COLUMNS
    max_rows: int = 200_000  # BUCKETML_MAX_ROWS: rows kept for training; more are sampled

    @classmethod
    def from_environment(cls) -> "Limits":
        return cls(**settings.upload_limits())


@dataclasses.dataclass
class Layout:
    """How the text is written, decided from its head."""

    encoding: str
    delimiter: str
    header: bool
    columns: list[str]
    notes: list[str]


class _Reader(io.RawIOBase):
    """A raw stream over any file-like object, refusing to read past `limit` bytes."""

    def __init__(self, stream, limit: int | None = None, name: str = ""):
        self.stream, self.limit, self.name, self.count = stream, limit, name, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        self.count += len(data)
        if self.limit is not None and self.count > self.limit:
            raise Rejection(
                "file_too_large",
                f"{self.name} has more than {self.limit} bytes of text; split it, or raise the limit "
                "(BUCKETML_MAX_TEXT_BYTES)",
            )
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.stream.close()
        super().close()


def looks_binary(head: bytes) -> bool:
    """NUL bytes, or many control characters other than tab and line ends, mean not text."""
    if b"\x00" in head:
        return True
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 13))
    return controls > len(head) * 0.05


def _utf16_without_bom(head: bytes) -> str | None:
    """UTF-16 text without a BOM has a NUL in every other byte of its ASCII characters."""
    if len(head) < 4:
        return None
    even, odd = head[0::2], head[1::2]
    if odd.count(0) > 0.9 * len(odd) and even.count(0) < 0.1 * len(even):
        return "utf-16-le"
    if even.count(0) > 0.9 * len(even) and odd.count(0) < 0.1 * len(odd):
        return "utf-16-be"
    return None


def detect_encoding(head: bytes, name: str) -> str:
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    utf16 = _utf16_without_bom(head)
    if utf16:
        return utf16
    if looks_binary(head[:8192]):
        raise Rejection("not_csv", f"{name} looks binary, not a CSV text file; upload the data exported as CSV")
    try:
        # The head may end inside a multi-byte character: decode incrementally, not final.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        return "utf-8"
    except UnicodeDecodeError:
        pass
    # Latin-1 decodes every byte, but C1 control characters (0x80-0x9f) mean it is not Latin-1
    # text either (Windows-1252 puts printable characters there).
    try:
        head.decode("cp1252")
        return "cp1252"
    except UnicodeDecodeError:
        c1 = sum(1 for b in head if 0x80 <= b <= 0x9F)
        if c1 > len(head) * 0.01:
            raise Rejection(
                "undecodable_text",
                f"{name} is not UTF-8, UTF-16 or Latin-1 text; export it as UTF-8 and upload again",
            ) from None
        return "latin-1"


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "."))
        return True
    except ValueError:
        return False


def detect_layout(text_head: str, name: str, spec: dict, limits: Limits, encoding: str) -> Layout:
    lines = text_head.lstrip("\r\n").splitlines()
    if not lines or not lines[0].strip():
        raise Rejection("empty_file", f"{name} has no rows; upload a CSV with a header row and data rows")
    first = lines[0]
    try:
        # Only these delimiters: an unrestricted sniff splits a one-column file on a letter.
        delimiter = csv.Sniffer().sniff(first, delimiters=DELIMITERS).delimiter
    except csv.Error:
        delimiter = ","
    fields = next(csv.reader([first], delimiter=delimiter, skipinitialspace=True))
    if len(fields) > limits.max_columns:
        raise Rejection(
            "too_many_columns",
            f"{name} has {len(fields)} columns; the limit is {limits.max_columns} (BUCKETML_MAX_COLUMNS)",
        )
    if len(fields) < 2:
        raise Rejection("not_csv", f"{name} has a single column; a dataset needs feature columns and a target column")
    notes = [f"read as {encoding} text, delimiter {delimiter!r}"]
    header = spec.get("header", "auto")
    if header == "auto":
        # Column names are not numbers: a first row with a number in it is data.
        header = not any(_is_number(f.strip()) for f in fields if f.strip())
    named = spec.get("columns")
    if header:
        columns = [f.strip() for f in fields]
        if named:
            raise Rejection("spec_invalid", f"{name} has a header row; 'columns' is only for files without one")
    else:
        if named:
            if len(named) != len(fields):
                raise Rejection(
                    "spec_invalid", f"'columns' names {len(named)} columns but {name} has {len(fields)}"
                )
            columns = list(named)
            notes.append("the file has no header row; column names come from the spec")
        else:
            columns = [f"column_{i}" for i in range(1, len(fields) + 1)]
            notes.append(
                f"the file has no header row; its columns were named column_1 to column_{len(fields)} "
                "(name them with 'columns:' in the spec)"
            )
    if len(set(columns)) != len(columns) or not all(columns):
        columns = _unique(columns)
        notes.append("blank or repeated column names were made unique")
    return Layout(encoding, delimiter, bool(header), columns, notes)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for i, name in enumerate(names, 1):
        base = name or f"column_{i}"
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return out


def _binary_stream(open_stream: Callable[[], BinaryIO], name: str, limits: Limits) -> io.BufferedReader:
    """The upload's bytes, decompressed if gzip, capped at the text limit."""
    raw = io.BufferedReader(_Reader(open_stream()))
    if raw.peek(2)[:2] == b"\x1f\x8b":
        raw = gzip.GzipFile(fileobj=raw, mode="rb")
    return io.BufferedReader(_Reader(raw, limits.max_text_bytes, name), buffer_size=1 << 20)


def read_csv(
    open_stream: Callable[[], BinaryIO] | bytes,
    name: str,
    spec: dict | None = None,
    limits: Limits | None = None,
) -> pd.DataFrame:
    """Read an upload into a DataFrame of typed columns (numbers, strings, NaN for missing).

    `open_stream` opens the object anew (it may be called twice: once more if the text turns
    out not to be UTF-8 past its head). The returned frame's `attrs` carry `notes` (what was
    decided) and `rows_read` (data rows in the file, before any sampling).
    """
    if isinstance(open_stream, (bytes, bytearray)):
        data = bytes(open_stream)
        open_stream = lambda: io.BytesIO(data)  # noqa: E731
    spec, limits = spec or {}, limits or Limits.from_environment()
    try:
        with _binary_stream(open_stream, name, limits) as stream:
            head = stream.read(HEAD_BYTES)
    except (OSError, EOFError, zlib.error) as exc:  # a broken gzip stream
        raise Rejection("not_csv", f"{name} is not a readable gzip file: {exc}") from None
    if not head.strip():
        raise Rejection("empty_file", f"{name} is empty; upload a CSV with a header row and data rows")
    encoding = detect_encoding(head, name)
    text_head = codecs.getincrementaldecoder(encoding)(errors="replace").decode(head, final=False)
    layout = detect_layout(text_head, name, spec, limits, encoding)
    try:
        frame, rows = _read_rows(open_stream, name, layout, limits)
    except UnicodeDecodeError:
        if not layout.encoding.startswith("utf-8"):
            raise Rejection("undecodable_text", f"{name} could not be decoded as {layout.encoding}") from None
        # Valid UTF-8 in its head, not further on: the usual Windows export. Read it again.
        layout.encoding = "cp1252"
        layout.notes[0] = f"read as cp1252 text (not UTF-8 after its first {HEAD_BYTES} bytes), delimiter {layout.delimiter!r}"
        try:
            frame, rows = _read_rows(open_stream, name, layout, limits)
        except UnicodeDecodeError:
            layout.encoding = "latin-1"
            frame, rows = _read_rows(open_stream, name, layout, limits)
    if rows == 0:
        raise Rejection("header_only", f"{name} has a header but no data rows")
    if rows > len(frame):
        layout.notes.append(f"sampled {len(frame)} of {rows} rows at random (BUCKETML_MAX_ROWS)")
    frame = type_values(frame.reset_index(drop=True), layout.delimiter)
    frame.attrs = {"notes": layout.notes, "rows_read": rows}
    return frame


def _read_rows(open_stream, name: str, layout: Layout, limits: Limits) -> tuple[pd.DataFrame, int]:
    """Every row as strings, streamed in chunks; at most max_rows kept (uniform sample)."""
    with io.TextIOWrapper(_binary_stream(open_stream, name, limits), encoding=layout.encoding, newline="") as text:
        return _sample_rows(text, name, layout, limits)


def _sample_rows(text, name: str, layout: Layout, limits: Limits) -> tuple[pd.DataFrame, int]:
    rng = np.random.default_rng(SEED)
    kept: pd.DataFrame | None = None
    keys = np.empty(0)
    rows = 0
    try:
        reader = pd.read_csv(
            text,
            sep=layout.delimiter,
            header=0 if layout.header else None,
            names=layout.columns,
            dtype=str,
            keep_default_na=False,  # missing tokens are decided below, after stripping spaces
            skipinitialspace=True,
            skip_blank_lines=True,
            chunksize=CHUNK_ROWS,
            engine="c",
        )
        for chunk in reader:
            rows += len(chunk)
            # A uniform, seeded sample: keep the rows with the smallest random keys. Once the
            # sample is full only rows under its largest key can enter, so little is copied.
            chunk_keys = rng.random(len(chunk))
            if kept is not None and len(kept) >= limits.max_rows:
                take = chunk_keys < keys.max()
                chunk, chunk_keys = chunk[take], chunk_keys[take]
            kept = chunk if kept is None else pd.concat([kept, chunk], ignore_index=True)
            keys = np.concatenate([keys, chunk_keys])
            if len(kept) > limits.max_rows:
                order = np.sort(np.argpartition(keys, limits.max_rows)[: limits.max_rows])  # in file order
                kept, keys = kept.iloc[order].reset_index(drop=True), keys[order]
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=layout.columns), 0
    except (pd.errors.ParserError, csv.Error) as exc:
        raise Rejection("not_csv", f"{name} could not be parsed as CSV: {exc}; check the delimiter and quoting") from None
    if kept is None:
        return pd.DataFrame(columns=layout.columns), 0
    return kept, rows


DECIMAL_COMMA = r"^[-+]?\d+(?:,\d+)?$"


def type_values(frame: pd.DataFrame, delimiter: str) -> pd.DataFrame:
    """Strings -> stripped strings with NaN for missing tokens; all-numeric columns -> numbers."""
    out = {}
    for name in frame.columns:
        text = frame[name].fillna("").astype(str).str.strip()
        missing = text.str.lower().isin(MISSING_TOKENS)
        present = text[~missing]
        if delimiter != "," and len(present) and present.str.match(DECIMAL_COMMA).all() and present.str.contains(",").any():
            # Decimal commas ('18,3'), as ';'-separated European exports write numbers.
            present = present.str.replace(",", ".", regex=False)
        numbers = pd.to_numeric(present, errors="coerce")
        if len(present) and numbers.notna().all():
            column = pd.Series(np.nan, index=frame.index, dtype="float64")
            column[~missing] = numbers.astype("float64")
        else:
            column = text.astype(object).where(~missing, np.nan)
        out[name] = column
    return pd.DataFrame(out, index=frame.index)
