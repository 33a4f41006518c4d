"""TOML files -> validated, frozen values. Unknown keys and wrong types are errors naming the key,
the file and the line, because a typo in a device's config must stop it at start-up, not at 3 am."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError


@dataclass(frozen=True)
class TomlDoc:
    """A parsed TOML file that remembers its text, so errors can point at a line."""

    path: str
    text: str
    data: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> TomlDoc:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror or e}", path=str(p)) from e
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"not valid TOML: {e}", path=str(p)) from e
        return cls(str(p), text, data)

    def line_of(self, table: tuple[str, ...], key: str) -> int | None:
        """Best-effort line number of ``key`` inside ``[table]`` (None when it cannot be found)."""
        current: tuple[str, ...] = ()
        header = re.compile(r"^\s*\[+\s*([^\]]+?)\s*\]+\s*(#.*)?$")
        key_re = re.compile(rf"^\s*(\"{re.escape(key)}\"|'{re.escape(key)}'|{re.escape(key)})\s*=")
        dotted_re = re.compile(rf"^\s*{re.escape('.'.join((*table, key)))}\s*=")
        for n, line in enumerate(self.text.splitlines(), start=1):
            m = header.match(line)
            if m:
                current = tuple(part.strip().strip("\"'") for part in m.group(1).split("."))
                if current == (*table, key):
                    return n
                continue
            if (current == table and key_re.match(line)) or (not current and dotted_re.match(line)):
                return n
        return None

    def error(self, message: str, table: tuple[str, ...] = (), key: str | None = None) -> ConfigError:
        line = self.line_of(table, key) if key else None
        return ConfigError(message, path=self.path, key=key, line=line)


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "an array", dict: "a table"}


def check_table(doc: TomlDoc, table: Mapping[str, Any], schema: Mapping[str, type | tuple[type, ...]],
                where: tuple[str, ...] = ()) -> None:
    """Refuse unknown keys and wrong value types in one table of ``doc``."""
    name = f"[{'.'.join(where)}]" if where else "top level"
    for key, value in table.items():
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise doc.error(f"unknown key '{key}' in {name} (known keys: {known})", where, key)
        want = schema[key]
        wants = want if isinstance(want, tuple) else (want,)
        ok = any(isinstance(value, w) and not (w is int and isinstance(value, bool)) for w in wants)
        if float in wants and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            expected = " or ".join(_TYPE_NAMES.get(w, w.__name__) for w in wants)
            raise doc.error(f"key '{key}' in {name} must be {expected}, got {type(value).__name__} "
                            f"{value!r}", where, key)


_HEADER_LINE = re.compile(r"^\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_LINE = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_.-]+)\s*=""")


class TomlLines:
    """The line of every key of a TOML text, arrays of tables (``[[step]]``) told apart by their index:
    ``line(("step", 2), "percent")`` is the third ``[[step]]``'s ``percent``."""

    def __init__(self, doc: TomlDoc) -> None:
        self.path = doc.path
        self.data = doc.data
        self._lines: dict[tuple[tuple[Any, ...], str | None], int] = {}
        current: tuple[Any, ...] = ()
        arrays: dict[tuple[str, ...], int] = {}
        for n, line in enumerate(doc.text.splitlines(), start=1):
            m = _HEADER_LINE.match(line)
            if m:
                name = tuple(part.strip().strip("\"'") for part in m.group(2).split("."))
                if m.group(1) == "[[":
                    current = (*name, arrays.get(name, 0))
                    arrays[name] = arrays.get(name, 0) + 1
                else:
                    current = name
                self._lines.setdefault((current, None), n)
                continue
            k = _KEY_LINE.match(line)
            if k:
                self._lines.setdefault((current, k.group(1).strip("\"'")), n)

    def line(self, table: tuple[Any, ...], key: str | None = None) -> int | None:
        """The line of ``key`` in ``table``, else of the table the key names (``[key]``, ``[[key]]``), else
        of the table's header, else of the key naming the table (an inline table)."""
        found = self._lines.get((table, key))
        if found is None and key is not None:
            found = self._lines.get(((*table, key), None)) or self._lines.get(((*table, key, 0), None))
        if found is None:
            found = self._lines.get((table, None))
        if found is None and table:
            found = self._lines.get((table[:-1], str(table[-1])))
        return found


def require(doc: TomlDoc, table: Mapping[str, Any], key: str, where: tuple[str, ...] = ()) -> Any:
    if key not in table:
        name = f"[{'.'.join(where)}]" if where else "the top level"
        raise ConfigError(f"missing required key '{key}' in {name}", path=doc.path, key=key)
    return table[key]


def choice(doc: TomlDoc, value: str, allowed: tuple[str, ...], key: str, where: tuple[str, ...] = ()) -> str:
    if value not in allowed:
        raise doc.error(f"key '{key}' must be one of {', '.join(allowed)}, got {value!r}", where, key)
    return value
