"""Stage ``clean``: readers, normalisers, filters, de-duplication and the split, over shards of
documents. :func:`clean` is the stage's entry function; :func:`clean_shard` and :func:`finalize`
are its two halves, for orchestrators that map shards over their own workers.

Exports are loaded lazily so that ``lmcore.config`` can validate filter and MinHash settings
against ``lmcore.data.clean.filters`` and ``lmcore.data.clean.dedup`` without an import cycle.
"""

from __future__ import annotations

from typing import Any

__all__ = ["clean", "clean_shard", "finalize", "raw_shards", "split_of", "work_dir"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lmcore.data.clean import stage

        return getattr(stage, name)
    raise AttributeError(f"module 'lmcore.data.clean' has no attribute {name!r}")
