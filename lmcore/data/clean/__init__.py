"""Stage ``clean``: readers, normalisers, filters, de-duplication and the split, over shards of
documents. :func:`clean` is the stage's entry function; :func:`clean_shard` and :func:`finalize`
are its two halves, for orchestrators that map shards over their own workers.
"""

from __future__ import annotations

from lmcore.data.clean.stage import clean, clean_shard, finalize, raw_shards, split_of, work_dir

__all__ = ["clean", "clean_shard", "finalize", "raw_shards", "split_of", "work_dir"]
