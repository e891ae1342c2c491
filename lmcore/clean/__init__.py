"""Stage ``clean``: readers, normalisers, filters, de-duplication and the split, over a stream
of documents. :func:`clean` is the stage's entry function."""

from lmcore.clean.stage import Cleaner, clean, split_of

__all__ = ["Cleaner", "clean", "split_of"]
