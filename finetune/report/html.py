"""``report.html``: one self-contained page per run (the plots embedded as base64 PNG), to open or send as is.

It opens with the recipe (``config.yaml``), then the plan (``plan.txt``), the final metrics
(``metrics_fit.txt``, ``metrics_test.txt``) and the plots; a section whose file the run lacks is left out.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from finetune import runs
from finetune.report import REPORT

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; }
pre { background: #f6f8fa; padding: 1rem; overflow-x: auto; font-size: 0.85rem; }
figure { display: inline-block; margin: 0 1rem 1rem 0; }
img { max-width: 100%; }
"""


def write_html(run: Path, plots: list[Path]) -> Path:
    """Write ``<run>/report.html`` from the run's files and the PNG ``plots``; return its path."""
    run = Path(run)
    sections = [
        ("Recipe", [runs.CONFIG]),
        ("Plan", [runs.PLAN]),
        ("Final metrics", [runs.metrics_file("fit"), runs.metrics_file("test")]),
    ]
    parts = [_files_section(title, run, names) for title, names in sections]
    if plots:
        figures = "\n".join(_figure(path) for path in plots)
        parts.append(f"<section><h2>Plots</h2>\n{figures}\n</section>")
    title = html.escape(f"{run.parent.name}/{run.name}")
    body = "\n".join(part for part in parts if part)
    page = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n{body}\n</body>\n</html>\n"
    )
    path = run / REPORT
    path.write_text(page, encoding="utf-8")
    return path


def _files_section(title: str, run: Path, names: list[str]) -> str:
    """A section showing each of the run's files ``names`` that exists, verbatim; empty when none does."""
    blocks = [
        f"<h3>{html.escape(name)}</h3>\n<pre>{html.escape((run / name).read_text(encoding='utf-8'))}</pre>"
        for name in names
        if (run / name).is_file()
    ]
    return f"<section><h2>{title}</h2>\n" + "\n".join(blocks) + "\n</section>" if blocks else ""


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = html.escape(path.stem)
    image = f'<img alt="{caption}" src="data:image/png;base64,{data}">'
    return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"
