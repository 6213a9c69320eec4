"""report.html from a real round 0 + round 1, parsed and rendered in headless Chromium."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from tests.helpers.runs import write_config
from vila2_curate.pipelines.executors.local import run_local
from vila2_curate.pipelines.report import write_report
from vila2_curate.schemas.config import load_config

EVIL_ALT = '<script>alert("alt")</script> & <img src=x onerror=alert(1)>'
EVIL_CAP = '</td><script>alert("vlm")</script><b onmouseover="x">bold</b>'
GALLERY = 6
SECTIONS = {"funnel", "clip", "words", "dedup", "specialists", "throughput", "gallery"}


def _inject(tar_path: Path) -> str:
    """Rewrite the first sample's alt-text and newest caption as hostile HTML (captions are untrusted)."""
    with tarfile.open(tar_path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    key = None
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tw:
        for m, data in members:
            if key is None and m.name.endswith(".json"):
                rec = json.loads(data)
                rec["text"] = EVIL_ALT
                rec["captions"][-1]["text"] = EVIL_CAP
                data = json.dumps(rec).encode()
                key = m.name[:-5]
            m.size = len(data)
            tw.addfile(m, io.BytesIO(data))
    tar_path.write_bytes(out.getvalue())
    assert key
    return key


@pytest.fixture(scope="module")
def rounds(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Round 0 (2 COYO sources: normalize, dedup, clipscore, clip_filter), then round 1 (recaption + OCR)."""
    tmp = tmp_path_factory.mktemp("report")
    stages = [
        {"type": "normalize"},
        {"type": "dedup", "methods": ["exact", "phash"]},
        {"type": "clipscore", "model": str(sample_dir / "models" / "clip")},
        {"type": "clip_filter", "top_percent": 90},
    ]
    cfg = write_config(sample_dir, tmp / "r0", tmp / "r0.yaml", stages=stages, sources=["coyo_bytes", "coyo_paths"])
    run_local(load_config(cfg), progress=False)

    r1 = {
        "name": "rep-r{round}",
        "batch_size": 32,
        "sources": [{"name": "prev", "kind": "vila_wds", "paths": [str(tmp / "r{prev_round}")]}],
        "stages": [
            {
                "type": "recaption",
                "prompts": "self_augment",
                "captioner": {
                    "model": str(sample_dir / "models" / "vlm"),
                    "model_tag": "demo-vlm",
                    "generation": {"max_new_tokens": 8, "seed": 0},
                    "runtime": {"batch_size": 16},
                },
            },
            {"type": "ocr"},
        ],
        "output": {"path": str(tmp / "r{round}"), "shard_max_samples": 64},
    }
    (tmp / "r1.yaml").write_text(yaml.safe_dump(r1, sort_keys=False))
    run_local(load_config(tmp / "r1.yaml", round=1), progress=False)

    _inject(sorted((tmp / "r1").rglob("*.tar"))[0])
    summaries = json.loads((tmp / "r0" / "summaries.json").read_text())
    summaries["dedup"]["examples"][0]["members"][0]["text"] = EVIL_ALT
    (tmp / "r0" / "summaries.json").write_text(json.dumps(summaries))
    return tmp / "r0", tmp / "r1"


class _Report(HTMLParser):
    """Counts what the checks need; tracks the class stack to tell gallery cells apart."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: set[str] = set()
        self.svgs = self.figures = self.scripts = 0
        self.handlers: list[str] = []
        self.entries: list[dict[str, list[str]]] = []
        self.dedup_texts: list[str] = []
        self.body: dict[str, str] = {}
        self._stack: list[tuple[str, str]] = []
        self._td = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        cls = a.get("class", "")
        self.handlers += [k for k in a if k.startswith("on")]
        if tag == "body":
            self.body = a
        elif tag == "section":
            self.sections.add(a.get("id", ""))
        elif tag == "svg" and not any(t == "svg" for t, _ in self._stack):
            self.svgs += 1
        elif tag == "figure" and "plot" in cls:
            self.figures += 1
        elif tag == "script":
            self.scripts += 1
        elif tag == "tr" and "gallery-entry" in cls:
            self.entries.append({"original": [], "caps": [], "imgs": []})
            self._td = 0
        elif tag == "td" and self.entries and self._in("tr", "gallery-entry"):
            self._td += 1
        elif tag == "img" and self.entries and self._in("tr", "gallery-entry"):
            self.entries[-1]["imgs"].append(a.get("src", "")[:23])
        if tag not in ("img", "br", "meta", "input", "path", "use", "rect", "line"):
            self._stack.append((tag, cls))

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            t, _ = self._stack.pop()
            if t == tag:
                break

    def _in(self, tag: str, cls: str) -> bool:
        return any(t == tag and cls in c for t, c in self._stack)

    def handle_data(self, data: str) -> None:
        if self._in("div", "cap") and self._in("tr", "gallery-entry"):
            self.entries[-1]["original" if self._td == 2 else "caps"].append(data)
        elif self._in("div", "cap") and self._in("div", "card"):
            self.dedup_texts.append(data)


def test_report_sections_plots_gallery_and_escaping(rounds: tuple[Path, Path], tmp_path: Path):
    r0, r1 = rounds
    path = write_report([str(r0), str(r1)], gallery=GALLERY)
    assert path == str(r0 / "report.html")
    text = Path(path).read_text()
    assert not [p for p in r0.iterdir() if ".tmp" in p.name]
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text  # offline
    p = _Report()
    p.feed(text)
    assert p.sections == SECTIONS
    # funnel 1 + CLIP 2 sources + words 1 + dedup 1 + specialists 1 + throughput 2 rounds
    assert p.svgs == p.figures == int(p.body["data-expected-plots"]) == 8
    assert p.scripts == 1 and not p.handlers  # our script only; no injected event handler survived
    assert len(p.entries) == GALLERY
    for e in p.entries:
        assert e["imgs"] == ["data:image/jpeg;base64,"]
        assert "".join(e["original"]).strip() and "".join(e["caps"]).strip()
    assert any("".join(e["original"]) == EVIL_ALT for e in p.entries)
    assert any("".join(e["caps"]) == EVIL_CAP for e in p.entries)
    assert EVIL_ALT in p.dedup_texts
    assert "&lt;script&gt;alert(&quot;vlm&quot;)&lt;/script&gt;" in text
    for section in (
        "clip_below_top_percent",
        "original (alt-text)",
        "round 1",
        "with OCR text",
        "GPU-h / 1M samples",
        "cut 0.",
    ):
        assert section in text, section


def _chromium() -> str:
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if exe:
        return exe
    msg = "chromium missing: run .ci/install_chromium.sh"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)


def _browser(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def test_report_renders_in_headless_chromium(rounds: tuple[Path, Path], tmp_path: Path):
    from PIL import Image

    exe = _chromium()
    r0, r1 = rounds
    path = Path(write_report([str(r0), str(r1)], dest=str(tmp_path / "report.html"), gallery=GALLERY))
    url = path.resolve().as_uri()
    dom = _browser(exe, tmp_path / "profile", "--dump-dom", url)
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stderr[-2000:]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    assert attrs.get("data-rendered") == "true", attrs
    assert int(attrs["data-plots"]) == int(attrs["data-expected-plots"]) == 8
    assert int(attrs["data-images"]) == GALLERY
    assert int(attrs["data-dedup-images"]) >= 2
    assert dom.stdout.count("<script") == 1 and "&lt;script&gt;" in dom.stdout  # hostile captions stayed text

    shot = tmp_path / "report.png"
    run = _browser(
        exe,
        tmp_path / "profile2",
        "--hide-scrollbars",
        "--window-size=1280,2400",
        f"--screenshot={shot}",
        url,
    )
    assert shot.exists(), run.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2400)
    lo, hi = img.convert("L").getextrema()
    colors = img.resize((320, 600)).getcolors(maxcolors=1 << 16)
    assert hi - lo > 100 and (colors is None or len(colors) > 50)  # text, plots and thumbnails, not blank


def test_report_without_work_dir_falls_back_to_published_scores(rounds: tuple[Path, Path], tmp_path: Path):
    """``_work`` may be cleaned after a run: CLIP histograms then come from the published clip_score."""
    r0, _ = rounds
    copy = tmp_path / "r0"
    shutil.copytree(r0, copy, ignore=shutil.ignore_patterns("_work"))
    p = _Report()
    text = Path(write_report([str(copy)], gallery=2)).read_text()
    p.feed(text)
    assert "kept rows only" in text and len(p.entries) == 2
    assert p.svgs == int(p.body["data-expected-plots"]) == 6  # no specialists; one throughput table


def test_report_module_entry_writes_the_same_page(rounds: tuple[Path, Path], tmp_path: Path):
    """``python -m vila2_curate.pipelines.report`` (the package's ``__main__``) renders what write_report does."""
    import sys

    r0, _ = rounds
    via_api = Path(write_report([str(r0)], gallery=2, dest=str(tmp_path / "api.html"))).read_bytes()
    dest = tmp_path / "cli.html"
    subprocess.run([sys.executable, "-m", "vila2_curate.pipelines.report", str(r0), "--gallery", "2",
                    "--dest", str(dest)], check=True, capture_output=True)
    assert dest.read_bytes() == via_api
