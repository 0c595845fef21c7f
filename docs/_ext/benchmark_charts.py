"""MkDocs hook: publish the charts of the latest benchmark run with the site.

The charts live where the benchmarks write them, ``benchmarks/latest/*.png`` (outside ``docs/``), and a
page shows one as ``![...](benchmarks/latest/chart.png)``. Adding them to the site's files from there,
rather than keeping a copy under ``docs/``, means a new run's chart is the one the site shows.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
CHARTS = Path("benchmarks") / "latest"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for chart in sorted((ROOT / CHARTS).glob("*.png")):
        path = (CHARTS / chart.name).as_posix()
        files.append(File(path, str(ROOT), config.site_dir, config.use_directory_urls))
    return files
