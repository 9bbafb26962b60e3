"""Reading config tables: every error names the file, the key and what is wrong."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config that cannot be served; the message names the file and the key."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        super().__init__(f"{file}: {key}: {problem}")
        self.file = file
        self.key = key
        self.problem = problem


class Reader:
    """Reads one table of the config, tracking which keys were used."""

    def __init__(self, file: str, prefix: str, table: Any) -> None:
        self.file = file
        self.prefix = prefix
        if not isinstance(table, dict):
            raise ConfigError(file, prefix or "<root>", "must be a table")
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...,
            secret: bool = False) -> Any:
        """`name` checked to be of `kind`; a `secret` value is never shown in an error."""
        self.used.add(name)
        if name not in self.table:
            if default is ...:
                raise self.fail(name, "missing required key")
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            # a secret's value is never echoed, whatever its type
            shown = kind_names((type(value),)) if secret else repr(value)
            raise self.fail(name, f"expected {kind_names(kinds)}, got {shown}")
        return value

    def sub(self, name: str, default: Any = ...) -> Reader:
        value = self.get(name, dict, default)
        return Reader(self.file, self.key(name), value)

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def kind_names(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def positive(r: Reader, name: str, value: float) -> None:
    if value <= 0:
        raise r.fail(name, f"must be positive, got {value!r}")
