"""Named plug-ins (strategies, projectors, speech encoders) and the options they take.

A config names a plug-in (`strategy.name: parallel`, `projector: qformer`); a `Registry` maps
that name to what slm builds. Built-ins register themselves when their module is imported.
Another package adds one without touching slm through a Python entry point in the kind's
group (`slm.strategies`, `slm.projectors`, `slm.encoders`; `slm.heads` is kept for head kinds):

    [project.entry-points."slm.strategies"]
    word_by_word = "my_package.word_by_word"

The convention: the entry point's name is the plug-in's name and its value a module (or
`module:attr`) whose import registers that name, with the same `register_*` call a built-in
makes. slm imports it the first time the name is looked up, so unused plug-ins cost nothing.
"""

from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points
from typing import Any, Generic, Iterator, TypeVar

from slm.config import dataclass_from_dict
from slm.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Plug-ins of one kind by name: registered ones, then entry points in `group`.

    `field` is the config field that names one (for errors); `register_call` is how a new one
    registers, so an unknown name's error shows the fix.
    """

    def __init__(self, kind: str, group: str, field: str, register_call: str):
        self.kind, self.group, self.field, self.register_call = kind, group, field, register_call
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T) -> None:
        self._entries[name] = obj

    def unregister(self, name: str) -> None:
        del self._entries[name]

    def get(self, name: str) -> T | None:
        """The plug-in registered as `name`, importing its entry point if it has one; else None."""
        if name not in self._entries:
            self._import_entry_point(name)
        return self._entries.get(name)

    def __getitem__(self, name: str) -> T:
        found = self.get(name)
        if found is None:
            raise ConfigError(f"{self.field}={name!r}; choose one of {', '.join(self.names())} "
                              f"(a new {self.kind} registers with {self.register_call}, or through "
                              f"a Python entry point in group '{self.group}')")
        return found

    def names(self) -> list[str]:
        """Every name a config may use: registered, or installed as an entry point."""
        return sorted(set(self._entries) | set(entry_points(group=self.group).names))

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def _import_entry_point(self, name: str) -> None:
        for point in entry_points(group=self.group, name=name):
            try:
                point.load()
            except Exception as err:
                raise ConfigError(f"{self.field}={name!r}: its entry point {point.value!r} "
                                  f"(group '{self.group}') failed to import: {err}") from err
            if name not in self._entries:
                raise ConfigError(f"{self.field}={name!r}: importing its entry point "
                                  f"{point.value!r} (group '{self.group}') registered no "
                                  f"{self.kind} {name!r}; the module must call "
                                  f"{self.register_call}({name!r}, ...)")
            return


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a plug-in that takes none: any key given is refused by name."""


def check_options_class(options_cls: Any, owner: str) -> None:
    """Registration fails at import, not at the first config, when options are no dataclass."""
    if not (isinstance(options_cls, type) and dataclasses.is_dataclass(options_cls)):
        raise ConfigError(f"{owner}: its options {options_cls!r} must be a dataclass")


def parse_options(options_cls: type[T], options: dict, where: str, owner: str) -> T:
    """`options_cls(**options)`, each value checked like a config field: an unknown key or a
    value of the wrong type fails naming `<where>.<key>` and the valid keys."""
    try:
        return dataclass_from_dict(options_cls, options, where)
    except ConfigError as err:
        raise ConfigError(f"{err} (the options of {owner})") from None
