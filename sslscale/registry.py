"""Name -> builder registries for objectives (and, later, datasets).

A recipe names its objective (``objective.name: mae``); ``OBJECTIVES.build(name, ...)`` finds
the builder registered under that exact name. An unknown name is an error that lists the valid
ones; nothing is chosen by substring. An objective registers with the dataclass of its config
section (``OBJECTIVES.register("mae", schema=MAEConfig)``); the dataclasses live in the
torch-free ``sslscale.config_schema``, which the config reads without importing the builders.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from exact names to builder callables."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}
        self._schemas: dict[str, type] = {}

    def register(self, name: str, schema: type | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register ``builder`` under ``name``, with ``schema`` (the dataclass of its
        config section) when given; ``ValueError`` if ``name`` is taken."""
        def deco(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._builders[name] = builder
            if schema is not None:
                self._schemas[name] = schema
            return builder
        return deco

    def schema(self, name: str) -> type | None:
        """The config dataclass registered with ``name`` (None if none was given); ``KeyError``
        listing the valid names for an unknown ``name``."""
        self.get(name)
        return self._schemas.get(name)

    def names(self) -> list[str]:
        return sorted(self._builders)

    def get(self, name: str) -> Callable[..., T]:
        """The builder for ``name``; ``KeyError`` listing the valid names otherwise."""
        try:
            return self._builders[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} '{name}'; valid: {', '.join(self.names())}") from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self.get(name)(*args, **kwargs)


OBJECTIVES: Registry = Registry("objective")
