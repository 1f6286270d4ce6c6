"""Reading an import CSV. Pure.

The first row names the columns; at least one of ``user_id``, ``email``, ``anonymous_id``,
``profile_id`` must be there (other columns are ignored). Each row is matched by the first
non-empty of those, in that order.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

ID_COLUMNS = ("user_id", "email", "anonymous_id", "profile_id")
MAX_ROWS = 200_000


class BadCsv(ValueError):
    """The file cannot be imported; the message says why."""


@dataclass(frozen=True, slots=True)
class Row:
    number: int  # 2 for the first data row (the header is row 1), as spreadsheets count
    kind: str | None
    value: str | None


def read(data: bytes) -> list[Row]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadCsv("the file is not UTF-8") from None
    if "\x00" in text:
        raise BadCsv("the file contains NUL characters")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise BadCsv("the file is empty") from None
    except csv.Error as exc:
        raise BadCsv(f"row 1: {exc}") from None
    names = [h.strip().lower() for h in header]
    columns = {name: i for i, name in enumerate(names) if name in ID_COLUMNS}
    if not columns:
        raise BadCsv(f"the header needs one of: {', '.join(ID_COLUMNS)}")
    rows: list[Row] = []
    try:
        for number, record in enumerate(reader, start=2):
            if not any(cell.strip() for cell in record):
                continue
            if len(rows) >= MAX_ROWS:
                raise BadCsv(f"at most {MAX_ROWS} rows per import")
            kind = value = None
            for name in ID_COLUMNS:
                i = columns.get(name)
                if i is not None and i < len(record) and record[i].strip():
                    kind, value = name, record[i].strip()
                    break
            rows.append(Row(number, kind, value))
    except csv.Error as exc:
        raise BadCsv(f"row {reader.line_num}: {exc}") from None
    return rows
