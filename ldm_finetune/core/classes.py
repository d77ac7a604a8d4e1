"""The class key of a slice, spelled once: "<state>/<orientation>" (e.g. "dry-compacted/warp"), built from the
prep metadata columns; on disk a class folder replaces "/" by "__" (dry-compacted__warp)."""

from __future__ import annotations

CLASS_COLUMNS = ["state", "orientation"]  # the metadata columns a class is made of, by default
SEPARATOR = "/"
FOLDER_SEPARATOR = "__"


def class_key(*values) -> str:
    """("dry", "warp") -> "dry/warp"."""
    return SEPARATOR.join(str(v) for v in values)


def row_class(row: dict, columns=CLASS_COLUMNS) -> str:
    """The class key of a metadata row (missing columns read as None)."""
    return class_key(*(row.get(c) for c in columns))


def split_class(key: str) -> tuple[str, str]:
    """"dry-compacted/warp" -> ("dry-compacted", "warp")."""
    first, _, rest = key.partition(SEPARATOR)
    return first, rest


def class_folder(key: str) -> str:
    return key.replace(SEPARATOR, FOLDER_SEPARATOR)


def class_from_folder(folder: str) -> str:
    return folder.replace(FOLDER_SEPARATOR, SEPARATOR)
