"""Real-browser check: the geometry notebook, executed on a tiny model with widget state saved, renders its
explorer (slider and Play button) in headless Chromium. Needs Debian's ``chromium`` and PyPI's ``playwright``;
the ipywidgets HTML manager and require.js come from the npm registry (``npm pack``), served to the page locally
because the page would otherwise fetch them from a CDN."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
JS_PACKAGES = {"@jupyter-widgets/html-manager@1": "dist/embed-amd.js", "requirejs@2": "require.js"}


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    return sync_playwright


def _js_files(cache: Path) -> dict[str, Path]:
    """Fetch the two browser bundles once with npm into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for spec, rel in JS_PACKAGES.items():
        name = spec.rsplit("@", 1)[0].replace("@", "").replace("/", "-")
        folder = cache / name
        if not (folder / "package" / rel).exists():
            tgz = subprocess.run(["npm", "pack", "--silent", spec], cwd=cache, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            folder.mkdir(exist_ok=True)
            subprocess.run(["tar", "xzf", str(cache / tgz), "-C", str(folder)], check=True)
        out[rel.rsplit("/", 1)[-1]] = folder / "package" / rel
    return out


@pytest.mark.skipif(CHROMIUM is None or _playwright() is None or shutil.which("npm") is None,
                    reason="needs Debian chromium (apt-get install chromium), playwright (pip install playwright) and npm")
def test_geometry_explorer_renders_in_chromium(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    monkeypatch.setenv("HERETICLAB_MODEL", "tiny:llama")
    monkeypatch.setenv("HERETICLAB_OUTPUT", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(ROOT / "notebooks" / "03_geometry.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", store_widget_state=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert "application/vnd.jupyter.widget-state+json" in notebook.metadata.get("widgets", {})
    html, _ = HTMLExporter().from_notebook_node(notebook)
    page_path = tmp_path / "03_geometry.html"
    page_path.write_text(html)
    js = _js_files(Path(os.environ.get("HERETICLAB_JS_CACHE", Path.home() / ".cache" / "hereticlab" / "js")))
    artefacts = Path(os.environ.get("HERETICLAB_ARTEFACTS", tmp_path))
    artefacts.mkdir(parents=True, exist_ok=True)

    def serve(route):
        if not route.request.url.startswith("http"):
            return route.continue_()  # the page itself and its local files
        name = route.request.url.rsplit("/", 1)[-1].split("?")[0]
        name = "require.js" if name.startswith("require") else name
        if name in js:
            route.fulfill(path=str(js[name]), content_type="application/javascript")
        else:
            route.abort()  # offline: anything else from the network is refused

    with _playwright()() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.route("**/*", serve)
        page.goto(page_path.as_uri())
        slider = page.locator(".widget-slider").first
        slider.wait_for(state="attached", timeout=60_000)
        assert page.locator(".widget-slider").count() >= 1
        assert page.locator(".widget-play").count() >= 1
        slider.scroll_into_view_if_needed()
        page.screenshot(path=str(artefacts / "geometry_explorer.png"), full_page=False)
        browser.close()
    assert (artefacts / "geometry_explorer.png").stat().st_size > 10_000
