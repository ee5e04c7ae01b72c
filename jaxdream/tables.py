"""Parquet files as inputs, local or in a bucket: a column of image bytes (``image.bytes`` as
Hugging Face datasets write it, a binary column named ``image``/``img``/``bytes``), or a list of
paths and URLs (a text column named ``path``, ``url``, ``image`` or ``file``); a config's
``image_column`` names the column instead (bytes, a struct with ``bytes``, or text).

Each row of an image column is one input named ``<file>#<row>.row`` and identified by the
file's identity (ETag and size, or size and modification time), the column and the row; only
the file's footer is read when planning. The worker reads the row's row group once (and keeps
the last one, as the rows of a unit are consecutive), checks the size of the bytes, and decodes
them like any file. Needs pyarrow (``pip install 'jaxdream[parquet]'``).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from jaxdream import storage
from jaxdream.errors import ConfigError, ImageError, JaxdreamError

ROW = "#"
_IMAGE_COLUMNS = ("image", "img", "bytes", "image_bytes", "jpg", "png")
_PATH_COLUMNS = ("path", "url", "uri", "image", "file", "filename", "image_path")


def is_table(entry: str) -> bool:
    return entry.split("?", 1)[0].lower().endswith(".parquet")


def _parquet(where: str) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{storage.redact(where)}: reading Parquet needs pyarrow "
                          f"(pip install 'jaxdream[parquet]')") from None
    if storage.is_url(where):
        fs, path = storage.filesystem(where)
        return pq.ParquetFile(fs.open(path, "rb"))
    return pq.ParquetFile(where)


def _image_column(schema: Any, wanted: str | None) -> tuple[str, str | None] | None:
    """(column, struct field holding the bytes or None), or None: no image column."""
    import pyarrow as pa

    for name in ([wanted] if wanted else _IMAGE_COLUMNS):
        if name not in schema.names:
            continue
        kind = schema.field(name).type
        if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
            return name, "bytes"
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return name, None
    return None


def _path_column(schema: Any, wanted: str | None, name: str, where: str) -> str:
    """The column of paths and URLs to read (``wanted``, else the first of the usual names);
    a ConfigError naming the file and the column when there is none."""
    import pyarrow as pa

    columns = ", ".join(schema.names)[:200]
    if wanted is None:
        texts = [key for key in _PATH_COLUMNS if key in schema.names]
        if not texts:
            raise ConfigError(f"{name}: {storage.redact(where)} has no image or path column "
                              f"(columns: {columns}); name one with image_column")
        return texts[0]
    if wanted not in schema.names:
        raise ConfigError(f"{name}: {storage.redact(where)} has no column {wanted!r} "
                          f"(image_column; columns: {columns})")
    kind = schema.field(wanted).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(f"{name}: {storage.redact(where)}: column {wanted!r} (image_column) "
                          f"holds {kind}, not image bytes (binary, or a struct with a 'bytes' "
                          f"field) nor paths (text)")
    return wanted


def _identity(where: str) -> dict[str, Any]:
    if storage.is_url(where):
        return json.loads(storage.identity(where))
    stat = os.stat(where)
    return {"path": where, "size": stat.st_size, "mtime": stat.st_mtime_ns}


def table_inputs(where: str, name: str, column: str | None = None) -> list[str]:
    """The inputs a Parquet file holds: one per row of its image column (identities recorded
    for planning), or the paths and URLs of its path column. ``column`` (the config's
    ``image_column``) names the column instead of the usual names; missing, or holding
    neither bytes nor text, it is one ConfigError line naming the file and the column."""
    try:
        table = _parquet(where)
        schema = table.schema_arrow
        image = _image_column(schema, column)
        if image is None:
            paths_from = _path_column(schema, column, name, where)
            paths = table.read(columns=[paths_from]).column(0).to_pylist()
            return [storage.relative_to(where, str(p)) for p in paths if p]
        base = _identity(where)
        found = []
        row = 0
        for group in range(table.metadata.num_row_groups):
            for index in range(table.metadata.row_group(group).num_rows):
                entry = f"{where}{ROW}{row:07d}.row"
                storage.register_identity(entry, json.dumps(
                    {**base, "column": image[0], "field": image[1], "group": group,
                     "index": index, "row": row, "table": True}, sort_keys=True))
                found.append(entry)
                row += 1
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file {storage.redact(where)}") from None
    except Exception as error:  # noqa: BLE001 - pyarrow's errors are many kinds: one line
        raise ConfigError(f"{name}: {storage.redact(where)}: not a readable Parquet file "
                          f"({storage.reason(error, where)})") from None
    if not found:
        raise ConfigError(f"{name}: {storage.redact(where)} has no rows")
    return found


@functools.lru_cache(maxsize=1)
def _row_group(where: str, planned: str, group: int, column: str) -> list[Any]:
    return _parquet(where).read_row_group(group, columns=[column]).column(0).to_pylist()


def read_row(entry: str, identity: dict[str, Any],
             max_bytes: int = storage.MAX_OBJECT_BYTES) -> bytes:
    """The image bytes of a row planned as ``identity``; one ImageError line if unreadable."""
    where = entry.rsplit(ROW, 1)[0]
    name = storage.redact(where) + ROW + entry.rsplit(ROW, 1)[1]
    try:
        now = _identity(where)
        if now.get("size") != identity.get("size"):
            raise ImageError(f"{name}: the file changed since the job was planned")
        values = _row_group(where, json.dumps(now, sort_keys=True), int(identity["group"]),
                            identity["column"])
        value = values[int(identity["index"])]
    except JaxdreamError:
        raise
    except Exception as error:  # noqa: BLE001 - one line, whatever pyarrow says
        raise ImageError(f"{name}: cannot read: {storage.reason(error, where)}") from None
    if identity.get("field") and isinstance(value, dict):
        value = value.get(identity["field"])
    if not isinstance(value, bytes | bytearray):
        raise ImageError(f"{name}: the row holds no image bytes")
    if len(value) > max_bytes:
        raise ImageError(f"{name}: larger than {max_bytes} bytes, refused")
    return bytes(value)
