"""Round saturation: per round k, words per caption (mean, std), the share of captions
changed from round k-1, consecutive-round text similarity and, when a clipscore stage runs after the
recaption, CLIP agreement per round, in summaries.json and in the report. Checked against figures
recomputed here from the published samples (and from CLIP run directly on them)."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.runs import write_config, write_round_config
from vila2_curate.curation.clipscore import ClipScoreStage
from vila2_curate.pipelines.executors.local import run_local
from vila2_curate.pipelines.report import render_report
from vila2_curate.pipelines.validate import read_vila_samples
from vila2_curate.schemas.config import ClipScoreConfig, load_config


def _round_cfg(sample: Path, root: Path, dest: Path, *, seed: int, clip: bool) -> Path:
    # clipscore after the recaption: every round's caption is scored against its image
    after = [{"type": "clipscore", "model": str(sample / "models" / "clip"), "runtime": {"batch_size": 16}}]
    return write_round_config(sample, root, dest, name="sat", seed=seed, after=after if clip else [])


@pytest.fixture(scope="module")
def rounds(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """r0: coyo_bytes through normalize + caption_hygiene; r1: recaption; r2: recaption + clipscore."""
    tmp = tmp_path_factory.mktemp("saturation")
    cfg = write_config(sample_dir, tmp / "r0", tmp / "r0.yaml",
                       stages=[{"type": "normalize"}, {"type": "caption_hygiene"}], sources=["coyo_bytes"])
    run_local(load_config(cfg), progress=False)
    run_local(load_config(_round_cfg(sample_dir, tmp, tmp / "r1.yaml", seed=0, clip=False), round=1), progress=False)
    run_local(load_config(_round_cfg(sample_dir, tmp, tmp / "r2.yaml", seed=1, clip=True), round=2), progress=False)
    return tmp


def _per_round(root: Path) -> tuple[dict[int, list[str]], dict[int, list[tuple[str, str]]], dict[int, list]]:
    """From the published samples: texts per round, (round k-1, round k) text pairs, (image, text) per round."""
    texts: dict[int, list[str]] = {}
    pairs: dict[int, list[tuple[str, str]]] = {}
    images: dict[int, list[tuple[bytes, str]]] = {}
    for s in read_vila_samples(str(root)):
        j = s[".json"]
        by_round = {0: j["text"]} if (j.get("text") or "").strip() else {}
        for c in j["captions"]:
            if (c["text"] or "").strip():
                by_round[c["round"]] = c["text"]
        img = next(s[k] for k in (".jpg", ".png", ".webp") if k in s)
        for k, t in by_round.items():
            texts.setdefault(k, []).append(t)
            images.setdefault(k, []).append((img, t))
            if k - 1 in by_round:
                pairs.setdefault(k, []).append((by_round[k - 1], t))
    return texts, pairs, images


def _words(t: str) -> list[str]:
    return re.findall(r"\w+", t.lower())


def test_summaries_report_words_change_and_similarity_per_round(rounds: Path):
    r2 = json.loads((rounds / "r2" / "summaries.json").read_text())["rounds"]
    texts, pairs, _ = _per_round(rounds / "r2")
    assert sorted(r2, key=int) == ["0", "1", "2"] and sorted(texts) == [0, 1, 2]
    for k, rec in r2.items():
        k = int(k)
        n_words = np.array([len(t.split()) for t in texts[k]], dtype=float)
        assert rec["captions"] == len(texts[k]) > 10
        assert rec["words_mean"] == pytest.approx(n_words.mean(), abs=1e-4)
        assert rec["words_std"] == pytest.approx(n_words.std(), abs=1e-4)  # population std, as Table 6
        if k == 0:
            assert "changed_share" not in rec
            continue
        p = pairs[k]
        changed = sum(" ".join(a.split()) != " ".join(b.split()) for a, b in p) / len(p)
        jac = np.mean([len(set(_words(a)) & set(_words(b))) / max(len(set(_words(a)) | set(_words(b))), 1)
                       for a, b in p])
        ratio = np.mean([difflib.SequenceMatcher(None, _words(a), _words(b), autojunk=False).ratio() for a, b in p])
        assert rec["compared_with_previous"] == len(p)
        assert rec["changed_share"] == pytest.approx(changed, abs=1e-4)
        assert rec["jaccard_mean"] == pytest.approx(jac, abs=1e-4)
        assert rec["difflib_ratio_mean"] == pytest.approx(ratio, abs=1e-4)
    assert r2["1"]["changed_share"] > 0.9  # the demo VLM rewrites every alt-text


def test_clip_agreement_per_round_only_when_clipscore_ran(rounds: Path, sample_dir: Path):
    r1 = json.loads((rounds / "r1" / "summaries.json").read_text())["rounds"]
    assert sorted(r1, key=int) == ["0", "1"] and not any("clip_n" in v for v in r1.values())  # no clipscore
    r2 = json.loads((rounds / "r2" / "summaries.json").read_text())["rounds"]
    _, _, images = _per_round(rounds / "r2")
    stage = ClipScoreStage(ClipScoreConfig(model=str(sample_dir / "models" / "clip")))
    for k, rec in r2.items():
        imgs, texts = zip(*images[int(k)], strict=True)
        _, cos, errors = stage.score(list(imgs), list(texts))
        assert all(e is None for e in errors)
        assert rec["clip_n"] == len(texts)
        assert rec["clip_cosine_mean"] == pytest.approx(float(np.mean(cos)), abs=2e-4)
        assert rec["clip_cosine_std"] == pytest.approx(float(np.std(cos)), abs=2e-4)
        assert rec["clip_score_mean"] == pytest.approx(float(np.mean(2.5 * np.maximum(cos, 0))), abs=5e-4)


def test_report_shows_round_saturation(rounds: Path):
    html = render_report([str(rounds / "r0"), str(rounds / "r1"), str(rounds / "r2")], gallery=0)
    section = html.split("<h3>Round saturation</h3>", 1)[1].split("</section>", 1)[0]
    r2 = json.loads((rounds / "r2" / "summaries.json").read_text())["rounds"]
    for k in ("1", "2"):
        assert f"round {k}</td>" in section
        assert f"{100 * r2[k]['changed_share']:.1f}%" in section
        assert f"{r2[k]['clip_cosine_mean']:,.3f}" in section
    assert "original (alt-text)" in section
