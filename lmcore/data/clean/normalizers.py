"""Normalisers: small steps that rewrite a document's text (``__call__(text) -> text``).

Each has a ``name`` for the statistics; a step that counts what it replaced keeps a ``counts``
Counter that the pipeline adds to the stage's metrics.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import unicodedata
from collections import Counter
from typing import ClassVar

import ftfy


@dataclasses.dataclass
class UnicodeNormalizer:
    """Unicode normal form (NFC keeps compatibility characters; NFKC folds them)."""

    form: str = "NFC"
    name: ClassVar[str] = "unicode"

    def __call__(self, text: str) -> str:
        return text if unicodedata.is_normalized(self.form, text) else unicodedata.normalize(self.form, text)


@dataclasses.dataclass
class MojibakeFixer:
    """Repairs text decoded with the wrong codec ("cafÃ©" -> "café") with ``ftfy.fix_encoding``;
    leaves everything else (quotes, ligatures, widths) alone."""

    name: ClassVar[str] = "mojibake"

    def __post_init__(self) -> None:
        self.counts: Counter = Counter()

    def __call__(self, text: str) -> str:
        if text.isascii():
            return text
        fixed = ftfy.fix_encoding(text)
        if fixed != text:
            self.counts["documents_repaired"] += 1
        return fixed


# C0/C1 controls except tab and newline, the zero-width space and word joiner, and the byte-order
# mark; not the zero-width (non-)joiners, which are part of Persian and Indic spelling and of emoji
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2060\ufeff]")


@dataclasses.dataclass
class ControlCharRemover:
    """Turns CR LF and CR into LF, and removes control and zero-width characters."""

    name: ClassVar[str] = "control_chars"

    def __call__(self, text: str) -> str:
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        return _CONTROL.sub("", text)


_TRAILING = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{3,}")


@dataclasses.dataclass
class WhitespaceNormalizer:
    """Strips trailing spaces on each line, keeps at most one blank line in a row, trims ends."""

    name: ClassVar[str] = "whitespace"

    def __call__(self, text: str) -> str:
        return _BLANKS.sub("\n\n", _TRAILING.sub("\n", text)).strip()


# the local part starts where a run of its characters starts (not at every word boundary inside
# it): each run is tried once, so a long run of such characters costs linear time, not quadratic
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
# IPv6 candidates, full or compressed ("2001:db8::1"), checked by the ipaddress module
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def _is_ipv6(candidate: str) -> bool:
    """An IPv6 address worth redacting: valid, with at least three groups written (``::1`` and a
    slice like ``a[1::2]`` are not someone's address)."""
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return sum(1 for g in candidate.split(":") if g) >= 3


@dataclasses.dataclass
class PIIRedactor:
    """Replaces e-mail addresses and IPv4/IPv6 addresses with placeholders (counted)."""

    email_placeholder: str = "<EMAIL>"
    """Replacement of an e-mail address."""
    ip_placeholder: str = "<IP_ADDRESS>"
    """Replacement of an IP address."""
    name: ClassVar[str] = "pii"

    def __post_init__(self) -> None:
        self.counts: Counter = Counter()

    def __call__(self, text: str) -> str:
        if "@" in text:
            text, n = _EMAIL.subn(self.email_placeholder, text)
            self.counts["emails_replaced"] += n
        if "." in text:
            text, n = _IPV4.subn(self.ip_placeholder, text)
            self.counts["ipv4_replaced"] += n
        if ":" in text:
            n = 0

            def redact(m: re.Match) -> str:
                nonlocal n
                if not _is_ipv6(m.group()):
                    return m.group()
                n += 1
                return self.ip_placeholder

            text = _IPV6.sub(redact, text)
            self.counts["ipv6_replaced"] += n
        return text
