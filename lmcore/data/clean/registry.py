"""The quality filters selectable by name under ``clean.filters`` in ``params.yaml``."""

from __future__ import annotations

import dataclasses
from typing import Any

from lmcore.data.clean import filters as f


def filter_registry() -> dict[str, list[tuple[str, type]]]:
    """Quality filters selectable under ``clean.filters``, by name: their steps in order, each
    ``("normalizer" | "filter", class)``."""
    return {
        "c4": [("normalizer", f.C4LineCleaner), ("filter", f.C4QualityFilter)],
        "gopher_quality": [("filter", f.GopherQualityFilter)],
        "gopher_repetition": [("filter", f.GopherRepetitionFilter)],
        "fineweb": [("filter", f.FineWebQualityFilter)],
        "language": [("filter", f.LanguageFilter)],
    }


def make_filters(name: str, overrides: dict[str, Any]) -> list[tuple[str, Any]]:
    """The steps of a named quality filter, each field in ``overrides`` replacing a default
    threshold. Raises ``ValueError`` naming an unknown filter or field."""
    registry = filter_registry()
    if name not in registry:
        raise ValueError(f"unknown filter '{name}'; allowed: {', '.join(registry)}")
    fields = {cls: {f.name for f in dataclasses.fields(cls) if f.init} for _, cls in registry[name]}
    allowed = set().union(*fields.values())
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for filter '{name}'; allowed: {sorted(allowed)}")
    return [(kind, cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if k in fields[cls]}))
            for kind, cls in registry[name]]
