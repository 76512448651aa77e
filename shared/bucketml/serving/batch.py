"""Batch scoring: a CSV stream in, the same rows with their predictions out, in bounded memory.

The rows are read in chunks of `CHUNK_ROWS` and each chunk is scored by the version's
onnxruntime session (`OnnxModel`), so memory depends on the chunk, not the file. Every record
of the input is written out as it was sent (its cells, quoting and all) followed by the
prediction cells, so the output is the input plus columns. Values are read as the predict
function reads request values (bucketml.encoding): an empty cell is a missing value, text in a
number column is an error naming the row and column.

numpy and onnxruntime only, like the rest of serving/: this runs in the predict image. A
numbers-only model's chunks are parsed by numpy in C (`np.loadtxt`); a chunk that numpy
refuses, and every chunk of a model with other column types, go through the csv module and
the per-value encoding, which names the first bad value.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from bucketml.encoding import FLOAT32_MAX, InvalidInput, feeds_from_columns
from bucketml.serving.runtime import OnnxModel

CHUNK_ROWS = 50_000  # rows scored at once: about 50,000 x the row's width in memory, whatever the file's size
READ_BYTES = 4 << 20  # bytes read from the stream at a time
MAX_RECORD_BYTES = 16 << 20  # one row: longer is no CSV of rows (or a quote never closes), and would defeat the bounded memory
PREDICTION = "prediction"
PROBABILITY = "probability_"

# Why a file was not scored (bucketml.batch.failed.v1 `reason`; docs/architecture.md lists them).
REASONS = (
    "invalid_name",  # not batch/<model>/<name>.csv with a valid model name
    "no_model",  # the model has no current version
    "not_csv",  # binary data or text that is not UTF-8
    "empty",  # no header, or a header and no row
    "missing_columns",  # the header lacks columns the model takes
    "invalid_row",  # a row with another number of cells than the header
    "invalid_value",  # a value the model's column cannot take
    "output_exists",  # a predictions object of an older generation of the same input name is there
)


class BatchRefused(Exception):
    """The file cannot be scored: `reason` is a code of REASONS, the message says what to do."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def output_columns(model: OnnxModel) -> list[str]:
    """The columns added after the input's: the prediction, then one probability per class."""
    if model.task == "classification":
        return [PREDICTION] + [PROBABILITY + str(c) for c in model.classes]
    return [PREDICTION]


def score_csv(model: OnnxModel, source: BinaryIO, out: BinaryIO, *, chunk_rows: int = CHUNK_ROWS) -> int:
    """Read the CSV `source`, write every row and its predictions to `out`; the number of rows.

    Raises BatchRefused for a file the model cannot score; `out` then holds a partial result
    that the caller must discard."""
    reads = _records(source)
    first: list[bytes] = []
    for first in reads:
        if first:
            break
    if not first:
        raise BatchRefused("empty", "the file is empty: send a CSV file with a header line and one row per line")
    header_raw = first[0].removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is no part of the header
    header = _header(header_raw)
    positions = _positions(model, header)
    out.write(header_raw + b"," + _csv_line(output_columns(model)) + b"\n")
    scorer = _ChunkScorer(model, header, positions)
    rows = 0
    for chunk in _chunks(itertools.chain([first[1:]], reads), chunk_rows):
        out.write(scorer.score(chunk, first_row=rows + 1))
        rows += len(chunk)
    if rows == 0:
        raise BatchRefused("empty", "the file has a header and no row: add the rows to score below the header")
    return rows


# --- reading records ---------------------------------------------------------------------------


def _records(source: BinaryIO, read_bytes: int = READ_BYTES) -> Iterator[list[bytes]]:
    """The CSV records, a list per read, each as the bytes sent without its line ending; blank
    lines are skipped.

    A record is one line, unless a quoted cell holds a line break: then it runs on until its
    quotes balance (CSV doubles a quote inside a quoted cell, so an odd count means open)."""
    pending = b""  # an incomplete last line of the previous read
    open_record: list[bytes] = []  # the lines of a record whose quotes are still open
    open_bytes = 0
    first = True
    while True:
        block = source.read(read_bytes)
        if first:
            first = False
            if b"\0" in block[:8192]:
                raise BatchRefused("not_csv", "the file holds binary data (NUL bytes), not CSV text: send a UTF-8 CSV file")
        if not block:
            break
        data = pending + block
        lines = data.split(b"\n")
        pending = lines.pop()
        if not open_record and b'"' not in data:  # the usual case: one record per line
            if b"\r" in data:
                lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
            yield lines if all(lines) else [line for line in lines if line]
        else:
            records = []
            for line in lines:
                if line.endswith(b"\r"):
                    line = line[:-1]
                if open_record:  # inside a quoted cell: this line continues it
                    open_record.append(line)
                    open_bytes += len(line) + 1
                    if line.count(b'"') % 2:  # the cell closed
                        records.append(b"\n".join(open_record))
                        open_record, open_bytes = [], 0
                elif line.count(b'"') % 2:  # a quoted cell opens on this line and runs on
                    open_record, open_bytes = [line], len(line)
                elif line:
                    records.append(line)
            yield records
        if len(pending) + open_bytes > MAX_RECORD_BYTES:
            raise BatchRefused("not_csv", f"a line (or a quoted cell) runs over {MAX_RECORD_BYTES >> 20} MiB: this is "
                                          "not a CSV file of rows, or a quote never closes; send one row per line")
    if pending.endswith(b"\r"):
        pending = pending[:-1]
    if open_record:  # a quote still open at the end: as sent, the csv module will say what it makes of it
        if pending:
            open_record.append(pending)
        yield [b"\n".join(open_record)]
    elif pending:
        yield [pending]


def _chunks(reads: Iterator[list[bytes]], size: int) -> Iterator[list[bytes]]:
    """The records regrouped into lists of `size` (the last one shorter)."""
    chunk: list[bytes] = []
    for records in reads:
        chunk.extend(records)
        while len(chunk) >= size:
            yield chunk[:size]
            del chunk[:size]
    if chunk:
        yield chunk


def _decoded(record: bytes, row: int | None) -> str:
    try:
        return record.decode("utf-8")
    except UnicodeDecodeError:
        where = "the header" if row is None else f"row {row}"
        raise BatchRefused("not_csv", f"{where} is not UTF-8 text: save the file as UTF-8 CSV and upload it again") from None


def _header(raw: bytes) -> list[str]:
    [names] = list(csv.reader([_decoded(raw, None)])) or [[]]
    names = [n.strip() for n in names]
    if not any(names):
        raise BatchRefused("empty", "the first line names no column: the first line must be the header, naming the columns")
    return names


def _positions(model: OnnxModel, header: list[str]) -> list[int]:
    """Where each of the model's columns is in the header; BatchRefused naming the missing ones."""
    where = {}
    for i, name in enumerate(header):
        where.setdefault(name, i)
    missing = [c["name"] for c in model.columns if c["name"] not in where]
    if missing:
        expected = ", ".join(c["name"] for c in model.columns)
        raise BatchRefused(
            "missing_columns",
            f"the header lacks column(s) {', '.join(missing)}; {model.model} version {model.version} takes "
            f"{expected} (other columns are kept in the output and not used): add the missing columns, "
            "with empty cells where a value is unknown",
        )
    return [where[c["name"]] for c in model.columns]


# --- scoring a chunk ---------------------------------------------------------------------------


class _ChunkScorer:
    def __init__(self, model: OnnxModel, header: list[str], positions: list[int]):
        self.model, self.header, self.positions = model, header, positions
        self.width = len(header)
        self.classes = model.classes
        # Each class's output cell (quoted when the label needs it), computed once.
        self._label_cells = {str(c): _csv_line([str(c)]) for c in model.classes}

    def score(self, records: list[bytes], first_row: int) -> bytes:
        matrix = self._fast_matrix(records) if self.model.numbers_only else None
        if matrix is not None:
            outputs = self.model.outputs_of_matrix(matrix)
        else:
            values = self._columns(records, first_row)
            try:
                outputs = self.model.outputs(values, len(records))
            except InvalidInput as exc:
                raise self._locate(values, first_row, exc) from None
        return self._lines(records, outputs)

    def _fast_matrix(self, records: list[bytes]) -> np.ndarray | None:
        """The model's columns of a chunk of plain numeric records as float32, parsed by numpy;
        None when anything is unusual (quotes, a bad value, a short row), for the exact path."""
        data = b"\n".join(records)
        if b'"' in data or not data.isascii():  # the exact path reads quoting and checks the text is UTF-8
            return None
        # numpy reads no empty field: spell a missing value as nan (,, twice: the replacements overlap).
        data = b"\n" + data + b"\n"
        if b",," in data:
            data = data.replace(b",,", b",nan,").replace(b",,", b",nan,")
        if b"\n," in data:
            data = data.replace(b"\n,", b"\nnan,")
        if b",\n" in data:
            data = data.replace(b",\n", b",nan\n")
        try:
            matrix = np.loadtxt(io.BytesIO(data), delimiter=",", dtype=np.float64, usecols=self.positions,
                                ndmin=2, encoding="latin-1", comments=None, quotechar=None)
        except (ValueError, IndexError):
            return None
        if matrix.shape != (len(records), len(self.positions)):
            return None
        if self.width > 1 and data.count(b",") != (self.width - 1) * len(records):
            return None  # a row with extra cells: the exact path names it
        finite = matrix[~np.isnan(matrix)]
        if not (np.abs(finite) <= FLOAT32_MAX).all():
            return None
        return matrix.astype(np.float32)

    def _columns(self, records: list[bytes], first_row: int) -> dict[str, list]:
        texts = [_decoded(record, first_row + i) for i, record in enumerate(records)]
        try:
            rows = list(csv.reader(texts))
        except csv.Error as exc:
            raise BatchRefused("invalid_row", f"rows {first_row}-{first_row + len(records) - 1} are not CSV the "
                               f"csv module reads ({exc}): check the quoting of those rows") from None
        if len(rows) != len(records):  # a record the csv module splits in two (a stray quote)
            raise BatchRefused("invalid_row", f"rows {first_row}-{first_row + len(records) - 1} hold a quote that "
                               "opens and never closes: quote cells as CSV does (\"a \"\"quoted\"\" cell\")")
        for i, cells in enumerate(rows):
            if len(cells) != self.width:
                raise BatchRefused(
                    "invalid_row",
                    f"row {first_row + i} has {len(cells)} cell(s) but the header names "
                    f"{self.width} columns: give every row one cell per column, empty where a value is unknown",
                )
        return {c["name"]: [row[j] for row in rows] for c, j in zip(self.model.columns, self.positions)}

    def _locate(self, values: dict[str, list], first_row: int, error: InvalidInput) -> BatchRefused:
        """The first row whose values the model refuses, as a BatchRefused naming row and column."""
        columns = self.model.columns
        rows = len(next(iter(values.values()), []))
        for i in range(rows):
            for column in columns:
                try:
                    feeds_from_columns([column], {column["name"]: [values[column["name"]][i]]}, 1)
                except InvalidInput as exc:
                    return BatchRefused(
                        "invalid_value",
                        f"row {first_row + i}: {exc}; correct the value, or leave the "
                        "cell empty for a missing value",
                    )
        return BatchRefused("invalid_value", f"rows {first_row}-{first_row + rows - 1}: {error}")

    def _lines(self, records: list[bytes], outputs: list[np.ndarray]) -> bytes:
        """The records with their prediction cells, as predict's answer spells the values: the
        label as a string, probabilities rounded to 6 decimals, a regression value as the
        float64 of the model's float32."""
        if self.model.task == "classification":
            cells = self._label_cells
            labels = [cells.get(label) or _csv_line([label]) for label in map(str, outputs[0].tolist())]
            probabilities = _fixed6(outputs[1].astype(np.float64))
            suffixes = list(map(b",".join, zip(labels, *probabilities)))
        else:
            suffixes = [_number_cell(v) for v in outputs[0].reshape(-1).astype(np.float64).tolist()]
        return b"\n".join(map(b",".join, zip(records, suffixes))) + b"\n"


def _fixed6(probabilities: np.ndarray) -> list[list[bytes]]:
    """Per class, each probability as text with 6 decimals (0.031452), as predict rounds them;
    made with integer arithmetic on byte arrays, since formatting floats one by one is slow."""
    micro = np.rint(np.clip(probabilities, 0.0, 1.0) * 1e6).astype(np.int64)  # 0 .. 1,000,000
    digits = (micro + 1_000_000).astype("S7").view(np.uint8).reshape(*micro.shape, 7)  # 1dddddd or 2000000
    text = np.empty((*micro.shape, 8), dtype=np.uint8)
    text[..., 0] = np.where(micro >= 1_000_000, ord("1"), ord("0"))
    text[..., 1] = ord(".")
    text[..., 2:] = digits[..., 1:]
    cells = text.view("S8").reshape(micro.shape)
    return [cells[:, k].tolist() for k in range(micro.shape[1])]


def _number_cell(value: float) -> bytes:
    return b"" if math.isnan(value) else repr(value).encode()


def _csv_line(cells: list[str]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(cells)
    return buffer.getvalue().encode("utf-8")
