"""The quality filters selectable by name under ``clean.filters`` in ``params.yaml``."""

from __future__ import annotations

import dataclasses
from typing import Any

from lmcore.config import FILTER_SETTINGS, FilterSettings, filter_settings
from lmcore.data.clean import filters as f


def filter_registry() -> dict[str, list[tuple[str, type]]]:
    """Quality filters selectable under ``clean.filters``, by name: their steps in order, each
    ``("normalizer" | "filter", class)``; every class of a name is a subclass of its settings
    section (``lmcore.config.FILTER_SETTINGS``)."""
    return {
        "c4": [("normalizer", f.C4LineCleaner), ("filter", f.C4QualityFilter)],
        "gopher_quality": [("filter", f.GopherQualityFilter)],
        "gopher_repetition": [("filter", f.GopherRepetitionFilter)],
        "fineweb": [("filter", f.FineWebQualityFilter)],
        "language": [("filter", f.LanguageFilter)],
    }


def make_filters(name: str, settings: FilterSettings | dict[str, Any] | None = None) -> list[tuple[str, Any]]:
    """The steps of a named quality filter with ``settings``: its section (``clean.filters.<name>``
    as :class:`lmcore.config.CleanConfig` holds it) or a mapping of overrides of the defaults.
    Raises ``ValueError`` naming an unknown filter or field."""
    settings = filter_settings(name, settings)
    values = {fd.name: getattr(settings, fd.name) for fd in dataclasses.fields(FILTER_SETTINGS[name])}
    return [(kind, cls(**values)) for kind, cls in filter_registry()[name]]
