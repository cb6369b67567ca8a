"""Text files users hand the project (configs, data rows): UTF-8 with or without Excel's byte-order mark."""

from __future__ import annotations

from pathlib import Path


def read_utf8(path: Path, error: type[Exception]) -> str:
    """The text of `path`; anything else raises `error` naming the file, the line and the byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        utf16 = " (a UTF-16 byte-order mark: save the file as UTF-8)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise error(
            f"{path}:{line}: not UTF-8 text (byte {err.start} is {data[err.start : err.start + 1]!r}){utf16}"
        ) from None
