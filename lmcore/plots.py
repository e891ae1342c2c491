"""``dvc plots show`` offline: DVC's HTML page loads Vega, Vega-Lite and Vega-Embed from a CDN
(jsdelivr), so without a network its plots are blank. This writes a page template with the three
libraries inlined (their bundle from ``vl-convert-python``, the Vega project's own packaging of
them) and points the repository's local DVC config at it (``plots.html_template`` in
``.dvc/config.local``, which git ignores). ``make setup`` runs it; without the package DVC keeps
its CDN page.
"""

from __future__ import annotations

import html
import subprocess
import sys
from pathlib import Path

from lmcore.core.errors import StageError
from lmcore.core.io import write_text

TEMPLATE = "lmcore-plots.html"  # inside .dvc/, as DVC resolves plots.html_template

PAGE = """<!DOCTYPE html>
<html>
<head>
{refresh_tag}
<meta charset="utf-8">
<title>DVC plots</title>
<!-- Vega, Vega-Lite and Vega-Embed, inlined by lmcore offline-plots (vl-convert-python {version}): no CDN -->
<script>{bundle}</script>
<style>body {{ font-family: system-ui, sans-serif; margin: 1.5em; }} table {{ border-spacing: 15px; }}</style>
</head>
<body>
<p>{note}</p>
{plot_divs}
</body>
</html>
"""


def template_text() -> str:
    """The page: DVC's placeholders ``{plot_divs}`` and ``{refresh_tag}``, no ``{scripts}`` (where
    DVC would put its CDN tags), the libraries inline."""
    try:
        import vl_convert  # lazy: optional (the [plots] extra); only this command needs it
    except ImportError as e:
        raise StageError("dvc plots offline needs vl-convert-python (pip install 'lmcore[plots]')") from e
    bundle = vl_convert.javascript_bundle()  # defines window.vegaEmbed, window.vega, window.vegaLite
    if "</script" in bundle.lower():
        raise StageError("vl-convert's bundle contains '</script': it cannot be inlined in an HTML page")
    for placeholder in ("{plot_divs}", "{refresh_tag}"):
        if placeholder in bundle:
            raise StageError(f"vl-convert's bundle contains DVC's placeholder {placeholder}: it cannot be inlined")
    page = PAGE.replace("{{", "{").replace("}}", "}")  # the CSS braces
    page = page.replace("{version}", getattr(vl_convert, "__version__", "?"))
    page = page.replace("{note}", html.escape("dvc plots show, rendered offline (lmcore offline-plots)"))
    return page.replace("{bundle}", bundle)  # last: the bundle's own text is not searched for placeholders


def install_offline_template(repo: Path = Path(".")) -> Path:
    """Write ``.dvc/lmcore-plots.html`` and set ``plots.html_template`` in ``.dvc/config.local``.
    Returns the template's path."""
    dvc_dir = repo / ".dvc"
    if not dvc_dir.is_dir():
        raise StageError(f"{repo.resolve()} is not a DVC repository (no .dvc/ folder)")
    path = dvc_dir / TEMPLATE
    write_text(path, template_text())
    done = subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", TEMPLATE],
                          cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        raise StageError(f"dvc config --local plots.html_template failed: {done.stderr.strip()[-300:]}")
    return path
