"""The language codes lmcore's language identification (py3langid 0.4) gives, as plain data.

The settings (``lmcore.config``) check ``clean.filters.language.languages`` against this list
without loading py3langid's model; ``tests/test_multilingual.py`` checks that it is exactly the
model's list.
"""

from __future__ import annotations

LANGUAGE_CODES = frozenset("""
ace af am an ar ary arz as az ba bcl be bg bn br bs ca crh cs cy da de dz el en eo es et eu ext fa
fi fo fr fuv fy ga gcf gcr gd gl gom grc gu gug guw ha hbo he hi hr ht hu hy id ig is it ja jv ka
kab kik kk km kn ko ku ky la lb lg lij ln lo lt ltg lv mg mk ml mn mr ms mt my ne nl nn no nso oc om
or pa pcm pl ps pt qu ro ru rw sa sdh se si sk sl sn so sq sr st sv sw ta te tg th tk tl tr tt ug uk
ur uz uzs vec vi vo wa wuu xh yo yue zh zu zxx
""".split())
"""py3langid's 140 codes: ISO 639-1 where one exists (``en``, ``zh``, ``ja``), else ISO 639-3
(``wuu``, ``yue``, ``arz``); ``zxx`` is "no linguistic content"."""

ANY = "any"
"""``clean.filters.language.languages: any``: keep documents in every language."""
