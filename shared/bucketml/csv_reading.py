"""Uploaded bytes -> a DataFrame: encoding, delimiter, header, missing-value tokens."""

from __future__ import annotations

import csv
import io

import pandas as pd

from .rejections import Rejection

MISSING_TOKENS = ["", "NA", "N/A", "n/a", "na", "NaN", "nan", "null", "NULL", "None", "?", "-"]


def looks_binary(head: bytes) -> bool:
    """NUL bytes, or many control characters other than tab and line ends, mean not text."""
    if b"\x00" in head:
        return True
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 13))
    return controls > len(head) * 0.05


def read_csv(raw: bytes, name: str) -> pd.DataFrame:
    if not raw.strip():
        raise Rejection("empty_file", f"{name} is empty; upload a CSV with a header row and data rows")
    if looks_binary(raw[:8192]):
        raise Rejection("not_csv", f"{name} looks binary, not a CSV text file; upload the data exported as CSV")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # every byte decodes; the usual non-UTF-8 export
    header = text.lstrip("\r\n")[:65536].partition("\n")[0]
    try:
        # Only these delimiters: an unrestricted sniff splits a one-column file on a letter.
        sep = csv.Sniffer().sniff(header, delimiters=",;\t|").delimiter
    except csv.Error:
        sep = ","
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep=sep,  # sniffed from the header: ',', ';', tab or '|'
            engine="python",
            na_values=MISSING_TOKENS,
            keep_default_na=True,
            skipinitialspace=True,
        )
    except pd.errors.EmptyDataError as exc:
        raise Rejection("empty_file", f"{name} has no columns") from exc
    except (pd.errors.ParserError, csv.Error) as exc:
        raise Rejection("not_csv", f"{name} could not be parsed as CSV: {exc}") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    if sep != ",":
        frame = decimal_commas_to_numbers(frame)
    if frame.empty:
        raise Rejection("header_only", f"{name} has a header but no data rows")
    if len(frame.columns) < 2:
        raise Rejection("not_csv", f"{name} has a single column; a dataset needs feature columns and a target column")
    return frame


DECIMAL_COMMA = r"^\s*[-+]?\d+(?:,\d+)?\s*$"


def decimal_commas_to_numbers(frame: pd.DataFrame) -> pd.DataFrame:
    """Text columns whose every value is a number written with a decimal comma ('18,3', as
    ';'-separated European exports write them) become numeric."""
    for name in frame.columns:
        col = frame[name]
        if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            continue
        values = col.dropna().astype(str)
        if len(values) and values.str.match(DECIMAL_COMMA).all() and values.str.contains(",").any():
            frame[name] = pd.to_numeric(col.astype(str).str.strip().str.replace(",", ".", regex=False), errors="coerce")
    return frame
