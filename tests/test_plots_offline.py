"""`dvc plots show` renders its Vega charts offline: the project's HTML template
(plots_template/template.html, wired in .dvc/config as plots.html_template) inlines Vega,
Vega-Lite and vega-embed instead of loading them from a CDN."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHROMIUM_FLAGS

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_DIR = ROOT / "plots_template"

# Two plots: a confusion matrix and a linear curve (the kinds the pipeline's dvc.yaml shows).
DVC_YAML = """\
plots:
  - confusion.csv:
      template: confusion
      x: actual
      y: predicted
  - Loss curve:
      x: step
      y:
        loss.csv: loss
"""
PLOT_DIV_IDS = ("confusion_csv", "Loss_curve")  # DVC's div ids for the plot names above


def _build_module():
    path = TEMPLATE_DIR / "build_template.py"
    spec = importlib.util.spec_from_file_location("build_template", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout.strip()


def _make_project(path: Path, html_template: str | None) -> Path:
    """A fresh git + DVC project with two plots; returns the `dvc plots show` page."""
    path.mkdir()
    _run(["git", "init", "-q"], path)
    _run(["dvc", "init", "-q"], path)
    _run(["dvc", "config", "core.analytics", "false"], path)
    if html_template is not None:
        shutil.copytree(TEMPLATE_DIR, path / TEMPLATE_DIR.name)
        _run(["dvc", "config", "plots.html_template", html_template], path)
    (path / "dvc.yaml").write_text(DVC_YAML)
    pairs = [("cat", "cat"), ("cat", "dog"), ("dog", "dog"), ("dog", "dog"), ("bird", "cat")]
    (path / "confusion.csv").write_text(
        "actual,predicted\n" + "".join(f"{a},{p}\n" for a, p in pairs)
    )
    (path / "loss.csv").write_text(
        "step,loss\n" + "".join(f"{i},{1 / (i + 1):.3f}\n" for i in range(10))
    )
    _run(["dvc", "plots", "show"], path)
    return path / "dvc_plots" / "index.html"


@pytest.fixture(scope="module")
def offline_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page from a project configured like this repository."""
    html_template = _run(["dvc", "config", "--project", "plots.html_template"], ROOT)
    assert html_template, ".dvc/config sets no plots.html_template"
    return _make_project(tmp_path_factory.mktemp("offline") / "project", html_template)


def test_repo_config_points_at_committed_template():
    html_template = _run(["dvc", "config", "--project", "plots.html_template"], ROOT)
    # DVC resolves a relative html_template against the .dvc/ folder.
    assert (ROOT / ".dvc" / html_template).resolve() == TEMPLATE_DIR / "template.html"
    template = (TEMPLATE_DIR / "template.html").read_text(encoding="utf-8")
    assert "{plot_divs}" in template
    assert "{scripts}" not in template  # DVC would put its CDN <script src=...> tags there
    for pkg in _build_module().PACKAGES:
        assert f"/*! {pkg.name}@{pkg.version} | {pkg.license} |" in template
        assert (TEMPLATE_DIR / "licenses" / f"{pkg.name}-LICENSE").is_file()


def test_plots_page_inlines_libraries_and_specs(offline_page: Path):
    html = offline_page.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.IGNORECASE), "external script"
    assert "cdn.jsdelivr.net" not in html
    for pkg in _build_module().PACKAGES:
        assert f"/*! {pkg.name}@{pkg.version} |" in html
    assert 't.version="5.' in html  # vega's own version string, from the minified build
    for div_id in PLOT_DIV_IDS:
        assert f'<div id = "{div_id}">' in html
    assert html.count("vegaEmbed('#") == len(PLOT_DIV_IDS)
    assert '"$schema": "https://vega.github.io/schema/vega-lite/v5.json"' in html
    assert '"actual": "bird"' in html and '"loss": "0.100"' in html  # the plots' data


def _render_dom(page: Path, tmp_path: Path) -> str:
    """Load ``page`` in headless Chromium with all network blackholed; return the DOM."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    result = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            "--proxy-server=http://127.0.0.1:9",  # nothing listens: any fetch fails, as offline
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _plot_sections(dom: str) -> dict[str, str]:
    """The DOM from each plot div's start to the next one's (the divs are siblings)."""
    starts = {div_id: dom.index(f'id="{div_id}"') for div_id in PLOT_DIV_IDS}
    ends = sorted([*starts.values(), dom.rindex("</body>")])
    return {div_id: dom[start : ends[ends.index(start) + 1]] for div_id, start in starts.items()}


def test_charts_render_in_headless_chromium_offline(offline_page: Path, tmp_path: Path):
    dom = _render_dom(offline_page, tmp_path)
    for div_id, section in _plot_sections(dom).items():
        assert 'class="vega-embed' in section, f"vega-embed did not run in #{div_id}"
        # The chart itself (vega-embed's actions menu has an <svg> icon of its own).
        charts = [t for t in re.findall(r"<(?:canvas|svg)\b[^>]*>", section) if '"marks"' in t]
        widths = [int(w) for t in charts for w in re.findall(r'\bwidth="(\d+)', t)]
        assert widths and min(widths) > 0, f"no chart drawn in #{div_id}"


def test_dvc_default_page_is_blank_offline(tmp_path: Path):
    """Control: the same project with DVC's default template draws nothing offline, so the
    Chromium check above would notice a regression."""
    page = _make_project(tmp_path / "project", html_template=None)
    assert "cdn.jsdelivr.net" in page.read_text(encoding="utf-8")
    dom = _render_dom(page, tmp_path)
    for div_id, section in _plot_sections(dom).items():
        assert 'class="marks"' not in section and 'class="vega-embed' not in section, div_id
