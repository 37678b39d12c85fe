"""The real browser with a live kernel: JupyterLab on loopback, notebooks 03 and 02 run in headless Chromium on
``tiny:llama``, and their widgets driven as a person would (the geometry explorer's layer slider by keyboard, the
trial picker's dropdown), checking what the page shows before and after.

Needs Debian's ``chromium`` (``.ci/browser-setup.sh`` installs it) driven by PyPI's ``playwright`` through
``executable_path`` (no playwright browser is downloaded), and ``jupyterlab`` with the ipywidgets labextension
(``jupyterlab_widgets``, a dependency of ipywidgets 8: widget JavaScript is served by the server, no CDN). The page
may reach only the loopback server; every other request is refused. With ``CI`` set (``.ci/run`` runs with
``CI=true``) anything missing fails the tests instead of skipping them. Screenshots (PNG) go to
``tests/artefacts/`` (``HERETICLAB_ARTEFACTS`` overrides), with ``browser_failure_<test>.png`` of the whole page when a
test fails; a failed run also prints the tail of the server's log. About 2 minutes on 2 busy cores.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["02_search.ipynb", "03_geometry.ipynb"]
ARTEFACTS = Path(os.environ.get("HERETICLAB_ARTEFACTS", ROOT / "tests" / "artefacts"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
STALL_SECONDS = 20  # s with unnumbered cells and nothing running before a run counts as stuck
RUN_TIMEOUT = 180  # s for one notebook's "Run All Cells" (each takes ~15 s of kernel time on tiny:llama)

# JupyterLab user settings for the test server: every cell in the DOM (no windowing, so all prompts and outputs
# can be read), no news/update requests, no autosave of the temporary copies.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}


def _chromium() -> str | None:
    """``HERETICLAB_CHROMIUM`` if set (and executable), else Debian's ``chromium`` on ``PATH``."""
    chosen = os.environ.get("HERETICLAB_CHROMIUM")
    if chosen:
        return chosen if os.path.isfile(chosen) and os.access(chosen, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _missing() -> list[str]:
    missing = []
    if _chromium() is None:
        missing.append("Debian's chromium (run .ci/browser-setup.sh as root, or apt-get install chromium)")
    for module, pip in (
        ("playwright.sync_api", "playwright"),
        ("jupyterlab", "jupyterlab"),
        ("jupyterlab_widgets", "ipywidgets>=8"),
    ):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"{pip} (pip install {pip})")
    return missing


def _require_browser() -> None:
    missing = _missing()
    if not missing:
        return
    reason = "the browser test needs " + "; ".join(missing)
    if IN_CI:  # a skip in CI would hide that the browser check never ran
        pytest.fail(f"{reason} -- CI is set, so this is a failure, not a skip", pytrace=False)
    pytest.skip(reason)


# -- the JupyterLab server ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_without_outputs(src: Path, dst: Path) -> None:
    """Copy a notebook with outputs, execution counts and saved widget state removed: everything the browser
    shows afterwards comes from the live kernel."""
    import nbformat

    nb = nbformat.read(src, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, dst)


class LabServer:
    def __init__(self, base: Path):
        self.base = base
        self.root, self.output, self.settings, self.workspaces = (
            base / n for n in ("root", "output", "settings", "workspaces")
        )
        for d in (self.root, self.output, self.settings, self.workspaces):
            d.mkdir(parents=True)
        for name in NOTEBOOKS:
            _copy_without_outputs(ROOT / "notebooks" / name, self.root / name)
        for rel, value in LAB_SETTINGS.items():
            (self.settings / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.settings / rel).write_text(json.dumps(value))
        self.port, self.token = _free_port(), secrets.token_hex(24)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("MPLBACKEND", None)  # the kernel's own inline backend, as for a person
        # one compute thread for the kernel: on a few shared cores (Chromium and the server want some too) torch's
        # OpenMP threads spin against each other and Run All of 02 took 3 min instead of 25 s
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
        env.update(
            HERETICLAB_MODEL="tiny:llama",
            HERETICLAB_OUTPUT=str(self.output),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_VERBOSITY="error",
            PYTHONWARNINGS="ignore",
            # private config and runtime dirs: no user configuration or kernelspec leaks in
            JUPYTER_CONFIG_DIR=str(self.base / "config"),
            JUPYTER_RUNTIME_DIR=str(self.base / "runtime"),
            JUPYTER_DATA_DIR=str(self.base / "data"),
            JUPYTER_PLATFORM_DIRS="1",
            IPYTHONDIR=str(self.base / "ipython"),
        )
        return env

    def start(self, timeout: float = 90) -> None:
        cmd = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.open_browser=False",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--ServerApp.terminals_enabled=False",
            f"--LabApp.user_settings_dir={self.settings}",
            f"--LabApp.workspaces_dir={self.workspaces}",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--ServerApp.allow_root=True")  # CI containers run as root
        self.log = open(self.log_path, "w")  # noqa: SIM115 -- open for the server's lifetime, closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.root,
            env=self.env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if self.api("GET", "/api/status").get("started"):
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"JupyterLab did not answer on {self.url} within {timeout} s:\n{self.log_text()}")

    def api(self, method: str, path: str):
        request = urllib.request.Request(
            self.url + path, method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def wait_for_connected_kernel(self, notebook: str, timeout: float = 120) -> None:
        """Wait until the server has a session for ``notebook`` whose kernel is idle with a browser connected, so
        that a Run All sent now reaches a kernel that is listening (the status bar's "Idle" can come earlier)."""
        deadline, sessions = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            sessions = self.api("GET", "/api/sessions") or []
            for session in sessions:
                kernel = session.get("kernel") or {}
                if (
                    session.get("path", "").endswith(notebook)
                    and kernel.get("execution_state") == "idle"
                    and kernel.get("connections", 0) > 0
                ):
                    return
            time.sleep(0.3)
        raise RuntimeError(f"no connected idle kernel for {notebook} within {timeout} s; sessions {sessions}")

    def shutdown_kernels(self) -> None:
        for kernel in self.api("GET", "/api/kernels") or []:
            self.api("DELETE", f"/api/kernels/{kernel['id']}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.shutdown_kernels()
            self.api("POST", "/api/shutdown")
        except OSError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group this fixture started: server and its kernels
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def log_text(self, tail: int = 6000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-tail:]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    _require_browser()
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    server = LabServer(tmp_path_factory.mktemp("jupyterlab"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=_chromium(), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, lab):
    """A fresh page that may reach only the loopback server."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
    blocked: list[str] = []

    def only_loopback(route):
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
            return route.continue_()
        blocked.append(route.request.url)
        return route.abort()

    context.route("**/*", only_loopback)
    page = context.new_page()
    page.blocked = blocked
    page.console_errors = []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    yield page
    context.close()
    with suppress(OSError):
        lab.shutdown_kernels()  # free the CPU for the next notebook
    if page.console_errors:
        print("browser console errors:", *page.console_errors[:20], sep="\n  ")


@contextmanager
def screenshot_on_failure(page, name: str):
    """Keep a picture of the whole page when the block fails (``browser_failure_<name>.png``)."""
    try:
        yield
    except BaseException:
        with suppress(Exception):  # the original failure matters more than a missing picture
            page.screenshot(path=str(ARTEFACTS / f"browser_failure_{name}.png"), full_page=True, timeout=10_000)
        raise


# -- driving JupyterLab ------------------------------------------------------------------------------------------

PROMPTS_JS = """() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')]
    .map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent?.trim() ?? '')"""
ERRORS_JS = r"""() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output')]
    .map(o => o.textContent).filter(t => /Traceback \(most recent call last\)/.test(t)).map(t => t.slice(-1500))"""


def open_and_run_all(page, lab: LabServer, name: str) -> float:
    """Open ``name`` in JupyterLab, wait for its kernel, choose Run ▸ Run All Cells in the menu bar and wait until
    every code cell has an execution count and the kernel is idle again. Returns the seconds the run took."""
    # ?reset: start from an empty workspace. JupyterLab saves the open tabs on the server; without it the page
    # restores the previous test's notebook, whose kernel is already shut down, next to this one (a CI failure).
    page.goto(f"{lab.url}/lab/tree/{name}?reset&token={lab.token}")
    page.locator(".jp-NotebookPanel .jp-CodeCell").first.wait_for(timeout=120_000)
    status = page.locator("#jp-main-statusbar")
    status.get_by_text(re.compile(r"\bIdle\b")).first.wait_for(timeout=120_000)  # kernel started
    lab.wait_for_connected_kernel(name)
    page.locator("#jp-MainMenu").get_by_role("menuitem", name="Run", exact=True).click()
    page.locator(".lm-Menu").get_by_role("menuitem", name="Run All Cells", exact=True).click()
    start, idle_since = time.monotonic(), None
    prompts: list[str] = []
    # done: every cell numbered and none queued or running ([*]). Cells left unnumbered with nothing running for
    # STALL_SECONDS mean the kernel dropped the queue: fail then, with the log, rather than wait the full timeout.
    while time.monotonic() - start < RUN_TIMEOUT:
        prompts = page.evaluate(PROMPTS_JS)
        if prompts and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts):
            break
        if "[*]:" in prompts:
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > STALL_SECONDS:
            break
        page.wait_for_timeout(500)
    seconds = time.monotonic() - start
    errors = page.evaluate(ERRORS_JS)
    assert prompts and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts) and not errors, (
        f"{name}: Run All Cells did not finish cleanly in {seconds:.0f} s; prompts {prompts}\n"
        + "\n".join(errors)
        + f"\nserver log:\n{lab.log_text(3000)}"
    )
    status.get_by_text(re.compile(r"\bIdle\b")).first.wait_for(timeout=30_000)
    return seconds


def wait_for_new_image(img, old_src: str | None, timeout: float = 30) -> str:
    """Wait until the ``<img>`` shows a different (loaded) source than ``old_src``; return the new source."""
    img.page.wait_for_function(
        "([el, old]) => el.src && el.src !== old && el.complete && el.naturalWidth > 0",
        arg=[img.element_handle(), old_src or ""],
        timeout=timeout * 1000,
    )
    return img.get_attribute("src")


def png(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def changed_pixels(a: bytes, b: bytes) -> int:
    from PIL import ImageChops

    first, second = png(a), png(b)
    if first.size != second.size:
        return first.size[0] * first.size[1]
    diff = ImageChops.difference(first, second).convert("L")
    return sum(diff.point(lambda v: 255 if v else 0).histogram()[255:])


# -- the tests ---------------------------------------------------------------------------------------------------


def test_browser_tools_are_present():
    """Chromium, playwright, JupyterLab and the widgets labextension: a skip outside CI, a failure in CI."""
    _require_browser()
    from jupyterlab_widgets import _version  # noqa: F401 -- the labextension that serves the widgets' JavaScript

    labextension = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "@jupyter-widgets" / "jupyterlab-manager"
    assert (labextension / "package.json").exists(), f"the ipywidgets labextension is not installed at {labextension}"


def test_geometry_explorer_slider_moves_the_plot(page, lab):
    with screenshot_on_failure(page, "test_geometry_explorer_slider_moves_the_plot"):
        seconds = open_and_run_all(page, lab, "03_geometry.ipynb")
        explorer = page.locator(".hl-geometry-explorer").first  # the first of the notebook's two explorers
        explorer.wait_for(state="visible", timeout=60_000)
        plot = explorer.locator("img.hl-geometry-plot")
        handle = explorer.locator(".hl-layer-slider .noUi-handle")
        readout = explorer.locator(".hl-layer-slider .widget-readout")
        src = wait_for_new_image(plot, None)
        explorer.scroll_into_view_if_needed()

        start = int(readout.inner_text())
        maximum = round(float(handle.get_attribute("aria-valuemax") or start + 1))
        forward, back = ("ArrowRight", "ArrowLeft") if start < maximum else ("ArrowLeft", "ArrowRight")
        handle.focus()  # focused in every screenshot, so the three differ only by what the kernel drew
        before = explorer.screenshot(path=str(ARTEFACTS / "browser_03_explorer_before.png"))

        handle.press(forward)  # the keyboard moves the slider by one step; the kernel redraws the picture
        src = wait_for_new_image(plot, src)
        moved = int(readout.inner_text())
        after = explorer.screenshot(path=str(ARTEFACTS / "browser_03_explorer_after.png"))
        assert moved == start + (1 if forward == "ArrowRight" else -1)
        n_changed = changed_pixels(before, after)
        assert n_changed > 0, "moving the layer slider left the explorer's picture unchanged"

        handle.press(back)
        wait_for_new_image(plot, src)
        again = explorer.screenshot(path=str(ARTEFACTS / "browser_03_explorer_back.png"))
        assert int(readout.inner_text()) == start
        assert changed_pixels(before, again) == 0, "moving back to the same layer drew a different picture"
        assert not page.blocked, f"the page tried to leave loopback: {page.blocked[:5]}"
        print(
            f"03: run all {seconds:.1f} s; layer index {start} -> {moved} changed {n_changed} pixels; back: identical"
        )


def test_trial_picker_shows_another_trials_responses(page, lab):
    with screenshot_on_failure(page, "test_trial_picker_shows_another_trials_responses"):
        seconds = open_and_run_all(page, lab, "02_search.ipynb")
        picker = page.locator(".hl-trial-picker").first
        picker.wait_for(state="visible", timeout=60_000)
        dropdown = picker.locator(".hl-trial-dropdown select")
        responses = picker.locator(".hl-trial-responses table")
        responses.wait_for(state="visible", timeout=30_000)
        picker.scroll_into_view_if_needed()

        def shown() -> tuple[str, list[str], str]:
            """(the trial column's header, its responses, the dropdown's text)."""
            header = responses.locator("thead th").last.inner_text().strip()
            column = responses.locator("tbody tr td:last-child").all_inner_texts()
            return header, column, dropdown.locator("option:checked").inner_text()

        header, column, label = shown()
        # the last cell ran picker.select(chosen): the dropdown names the trial that the table shows
        assert re.search(r"#(\d+)", label).group(1) == re.search(r"#(\d+)", header).group(1)
        text_before = picker.locator(".hl-trial-responses").inner_text()
        picker.screenshot(path=str(ARTEFACTS / "browser_02_picker_before.png"))

        labels = dropdown.locator("option").all_inner_texts()
        others = [i for i, t in enumerate(labels) if t != label]
        assert others, f"the study offers only one trial: {labels}"
        # prefer a trial whose responses differ from the ones shown: try each other trial until one does
        for index in others:
            dropdown.select_option(index=index)  # what choosing in the dropdown does (fires input and change)
            # the HTML widget's element stays, its table is replaced: wait until the old trial's header is gone
            page.wait_for_function(
                "([el, old]) => !el.innerText.includes(old)",
                arg=[picker.locator(".hl-trial-responses").element_handle(), header],
                timeout=60_000,
            )
            new_header, new_column, new_label = shown()
            if new_column != column:
                break
        picker.screenshot(path=str(ARTEFACTS / "browser_02_picker_after.png"))
        text_after = picker.locator(".hl-trial-responses").inner_text()
        assert re.search(r"#(\d+)", new_label).group(1) == re.search(r"#(\d+)", new_header).group(1)
        assert new_header != header and text_after != text_before
        assert new_column != column, f"every trial displays the same responses as {header}: {column}"
        assert not page.blocked, f"the page tried to leave loopback: {page.blocked[:5]}"
        print(f"02: run all {seconds:.1f} s; {header} -> {new_header}: {column} -> {new_column}")
