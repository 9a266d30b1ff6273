"""Reading report pages in tests: a plain HTML parser (links, images, ids, table rows) and headless
Chromium with the network off (screenshot, the DOM after its scripts ran).

Chromium is Debian's ``chromium`` (.ci/run installs it). It runs with every background service
off, a proxy that goes nowhere and a host resolver that resolves nothing, so a page that needs
the network shows it."""
import base64
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--hide-scrollbars", "--proxy-server=127.0.0.1:9",
                  "--host-resolver-rules=MAP * ~NOTFOUND"]


class Page(HTMLParser):
    """What a test asks of a page: every href/src with its tag, the ids, the subject table's rows."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.refs, self.ids, self.rows, self.classes = [], set(), [], []
        self._in_subjects = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if a.get("class"):
            self.classes.append((tag, a["class"]))
        for key in ("href", "src", "xlink:href"):
            if a.get(key) is not None:
                self.refs.append((tag, key, a[key]))
        if tag == "table" and a.get("id") == "subjects":
            self._in_subjects = True
        if self._in_subjects and tag == "tr" and "data-subject" in a:
            self.rows.append(a)

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_subjects = False


def broken_refs(page: Page, folder: Path) -> list:
    """Every href/src that does not resolve offline: an external URL, a missing local file, an
    anchor with no element, a data: image that is not a decodable PNG."""
    bad = []
    for tag, key, ref in page.refs:
        if ref.startswith(("http:", "https:", "//", "ftp:")):
            bad.append(f"external {tag} {key}={ref}")
        elif ref.startswith("data:"):
            head, _, data = ref.partition(",")
            if head != "data:image/png;base64" or not base64.b64decode(data).startswith(b"\x89PNG"):
                bad.append(f"bad data URI in {tag}: {head}")
        elif ref.startswith("#"):
            if ref[1:] not in page.ids:
                bad.append(f"anchor {ref} has no element")
        elif not (folder / ref.split("#")[0]).is_file():
            bad.append(f"missing file {ref} (from {folder})")
    return bad


def chromium() -> str:
    return shutil.which("chromium") or shutil.which("chromium-browser") or ""


def _run(args: list, timeout: int = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "HOME": profile})


def dump_dom(path: Path) -> str:
    """The page's DOM after its scripts ran (``--dump-dom``)."""
    res = _run(["--virtual-time-budget=5000", "--dump-dom", Path(path).resolve().as_uri()])
    assert res.returncode == 0 and "<html" in res.stdout, res.stderr[-2000:]
    return res.stdout


def screenshot(path: Path, png: Path, size=(1400, 2000)) -> Path:
    res = _run([f"--window-size={size[0]},{size[1]}", f"--screenshot={png}", "--virtual-time-budget=5000",
                Path(path).resolve().as_uri()])
    assert res.returncode == 0 and Path(png).is_file(), res.stderr[-2000:]
    return Path(png)


def blank_fraction(png: Path) -> tuple:
    """(share of near-white pixels, number of distinct colours) of a screenshot."""
    import numpy as np
    from PIL import Image
    a = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    white = (a.min(axis=2) > 245).mean()
    colours = len(np.unique(a.reshape(-1, 3)[:: 7], axis=0))
    return float(white), colours
