"""Specialist-augment stages: OCR recall on rendered text, geometry, grounding demo model, sidecar texts."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageFont

from tests.helpers.loopback_http import ChatCompletionsServer, chat_completion
from vila2_curate.recaption.backends import CaptionerUnavailable
from vila2_curate.recaption.prompts import load_prompt_set
from vila2_curate.schemas.config import (
    CaptionerConfig,
    GenerationParams,
    GroundingConfig,
    OcrConfig,
    SpatialConfig,
)
from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table
from vila2_curate.specialists import geometry as g
from vila2_curate.specialists._common import VLM_MARKER, split_vlm_text
from vila2_curate.specialists.grounding import GroundingStage, select_detections
from vila2_curate.specialists.ocr import OcrStage
from vila2_curate.specialists.phrases import noun_phrases
from vila2_curate.specialists.sidecar import SIDECAR_DIRS, bbox_interleaved_answer, specialist_texts
from vila2_curate.specialists.spatial import SpatialStage
from vila2_curate.specialists.vlm import VlmPrompter


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _table(items: list[dict]) -> pa.Table:
    rows = [{"key": f"k{i}", "source": "t", "shard": "0", "quarantined": False, **it} for i, it in enumerate(items)]
    return make_table(rows, PAIR_SCHEMA)


def _rendered_text() -> tuple[bytes, list[dict]]:
    """Dark words on white at 48 px, two lines; the word boxes PIL drew them in."""
    font = ImageFont.load_default(size=48)
    img = Image.new("RGB", (900, 300), "white")
    draw = ImageDraw.Draw(img)
    words = []
    for y, line in ((60, ["FRESH", "COFFEE", "DAILY"]), (170, ["Garden", "market", "open"])):
        x = 40.0
        for wd in line:
            draw.text((x, y), wd, font=font, fill=(25, 25, 25))
            words.append({"text": wd, "box": list(draw.textbbox((x, y), wd, font=font))})
            x += font.getlength(wd + " ")
    return _png(img), words


def _sample_text_items(sample_dir: Path, n: int = 6) -> list[tuple[bytes, dict]]:
    gt = json.loads((sample_dir / "ground_truth.json").read_text())
    recs = [r for r in gt["records"] if r["kind"] == "text" and r["source"] == "img2dataset"
            and r["expected"] == "keep" and r["words"]][:n]
    out = []
    for r in recs:
        with tarfile.open(sample_dir / r["file"]) as tf:
            out.append((tf.extractfile(f"{r['key']}.{r['format']}").read(), r))
    return out


# -- geometry --------------------------------------------------------------------------------------------
def test_geometry_primitives() -> None:
    assert g.quad_to_xyxy([[10, 20], [110, 18], [112, 60], [8, 62]], 200, 100) == [0.04, 0.18, 0.56, 0.62]
    assert g.normalise_xyxy([-5, 10, 250, 50], 200, 100) == [0.0, 0.1, 1.0, 0.5]
    assert g.iou([0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]) == pytest.approx(1.0)
    assert g.iou([0, 0, 0.2, 0.2], [0.5, 0.5, 1, 1]) == 0.0
    assert g.iou([0, 0, 0.4, 0.4], [0.2, 0, 0.6, 0.4]) == pytest.approx(1 / 3)
    boxes = [[0, 0, 0.4, 0.4], [0.02, 0, 0.42, 0.4], [0.6, 0.6, 0.9, 0.9]]
    assert g.nms(boxes, [0.8, 0.9, 0.5], 0.5) == [1, 2]
    # two lines, the second word of line one slightly lower; reading order groups by line
    words = [[0.5, 0.12, 0.7, 0.2], [0.1, 0.1, 0.3, 0.2], [0.1, 0.5, 0.3, 0.6]]
    assert g.reading_order(words) == [[1, 0], [2]]
    a, b = [0.0, 0.0, 0.2, 0.2], [0.5, 0.6, 0.9, 0.95]
    assert g.pair_relations(a, b) == ["left of", "above", "smaller than"]
    assert g.pair_relations(b, a) == ["right of", "below", "larger than"]
    assert g.pair_relations([0.1, 0.1, 0.5, 0.5], [0.3, 0.3, 0.7, 0.7]) == ["overlapping"]
    assert g.nearest([a, b, [0.25, 0.0, 0.4, 0.2]]) == [2, 2, 0]


def test_spatial_stage_from_ground_truth_shapes() -> None:
    """Shapes drawn at known boxes; the ground-truth boxes are the grounding input."""
    w, h = 400, 300
    shapes = {"red ellipse": [20, 20, 120, 100], "blue triangle": [260, 180, 380, 290],
              "green rectangle": [240, 10, 390, 120]}
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.ellipse(shapes["red ellipse"], fill=(220, 30, 35))
    x0, y0, x1, y1 = shapes["blue triangle"]
    d.polygon([(x0, y1), ((x0 + x1) / 2, y0), (x1, y1)], fill=(30, 70, 210))
    d.rectangle(shapes["green rectangle"], fill=(30, 160, 60))
    grounding = [{"label": k, "box": g.normalise_xyxy(v, w, h), "score": 0.9} for k, v in shapes.items()]
    spec = {"grounding": grounding, "grounding_text": "kept", "ocr": [], "ocr_text": "OCR",
            "spatial": None, "spatial_text": None, "models": json.dumps({"ocr": "x"})}
    out = SpatialStage(SpatialConfig(max_relations=20))(_table([{"image": _png(img), "specialists": spec}]))
    got = out.column("specialists")[0].as_py()
    s = set(got["spatial"])
    assert "the red ellipse is left of the green rectangle." in s
    assert "the blue triangle is below the green rectangle." in s
    assert "the red ellipse is left of the blue triangle." in s and "the red ellipse is above the blue triangle." in s
    assert "the green rectangle is larger than the red ellipse." in s
    assert "the green rectangle is the nearest object to the blue triangle." in s
    assert not any("overlaps" in x for x in s)
    assert got["spatial_text"].startswith("The ") and got["ocr_text"] == "OCR"  # other fields untouched
    assert json.loads(got["models"]) == {"ocr": "x", "spatial": "geometry-v1"}
    few = SpatialStage(SpatialConfig(max_relations=2))(_table([{"image": _png(img), "specialists": spec}]))
    assert few.column("specialists")[0].as_py()["spatial"] == got["spatial"][:2]  # deterministic prefix


# -- OCR -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ocr_run(sample_dir: Path) -> dict:
    """One OCR pass over the sample's text images, a rendered image, and bad rows (keeps the test fast)."""
    sample = _sample_text_items(sample_dir)
    rendered, rwords = _rendered_text()
    items = [{"image": data, "text": r["caption"]} for data, r in sample]
    items += [{"image": rendered, "text": "a sign"}, {"image": b"\xff\xd8 not a jpeg"}, {"image": None},
              {"image": rendered, "drop_reason": "dedup_exact: dup of k0", "drop_stage": "dedup"}]
    stage = OcrStage(OcrConfig(min_score=0.5))
    out = stage(_table(items))
    return {"out": out, "sample": sample, "rendered_words": rwords, "n_sample": len(sample), "stage": stage}


def _recall(lines: list[dict], words: list[dict], width: int, height: int) -> tuple[float, float]:
    """(word recall over whitespace tokens, share of words whose box lies inside a line box reading it)."""
    tokens = [t for ln in lines for t in ln["text"].split()]
    found = boxed = 0
    for wd in words:
        if wd["text"] in tokens:
            found += 1
            tokens.remove(wd["text"])
        wb = g.normalise_xyxy(wd["box"], width, height)
        if any(wd["text"] in ln["text"].split() and g.contains(ln["box"], wb, tol=0.02) for ln in lines):
            boxed += 1
    return found / len(words), boxed / len(words)


def test_ocr_reads_sample_text_images(ocr_run: dict) -> None:
    out = ocr_run["out"].column("specialists").to_pylist()
    total = found = boxed = 0
    for k, (_, rec) in enumerate(ocr_run["sample"]):
        lines = out[k]["ocr"]
        assert all(0 <= v <= 1 for ln in lines for v in ln["box"]) and all(ln["score"] >= 0.5 for ln in lines)
        r, b = _recall(lines, rec["words"], rec["width"], rec["height"])
        n = len(rec["words"])
        total, found, boxed = total + n, found + r * n, boxed + b * n
        assert json.loads(out[k]["models"])["ocr"].startswith("rapidocr-onnxruntime==")
    assert ocr_run["n_sample"] >= 5
    assert found / total >= 0.9, f"word recall {found / total:.2f}"
    assert boxed / total >= 0.9, f"word boxes inside OCR boxes {boxed / total:.2f}"


def test_ocr_rendered_text_reading_order(ocr_run: dict) -> None:
    k = ocr_run["n_sample"]
    spec = ocr_run["out"].column("specialists")[k].as_py()
    r, b = _recall(spec["ocr"], ocr_run["rendered_words"], 900, 300)
    assert r >= 0.9 and b >= 0.9
    first, second = spec["ocr_text"].split("\n")
    assert first.split() == ["FRESH", "COFFEE", "DAILY"] and second.lower().split() == ["garden", "market", "open"]
    ys = [ln["box"][1] for ln in spec["ocr"]]
    assert ys == sorted(ys) or spec["ocr"][0]["box"][1] < spec["ocr"][-1]["box"][1]


def test_ocr_bad_images_quarantined_not_the_batch(ocr_run: dict) -> None:
    out, k = ocr_run["out"], ocr_run["n_sample"]
    reasons = out.column("drop_reason").to_pylist()
    assert reasons[k + 1].startswith("image_undecodable: ") and reasons[k + 2] == "image_undecodable: empty image bytes"
    assert out.column("drop_stage").to_pylist()[k + 1: k + 3] == ["ocr", "ocr"]
    assert out.column("quarantined").to_pylist()[k + 1: k + 3] == [True, True]
    assert reasons[k + 3].startswith("dedup_exact") and out.column("specialists")[k + 3].as_py() is None
    assert all(r is None for r in reasons[: k + 1]) and out.num_rows == k + 4


# -- grounding ---------------------------------------------------------------------------------------------
def test_noun_phrases() -> None:
    cap = "Simple geometric illustration: purple ellipse, black rectangle and blue triangle"
    assert noun_phrases(cap) == ["purple ellipse", "black rectangle", "blue triangle"]
    assert noun_phrases("An orange ellipse on a plain background") == ["orange ellipse"]
    assert noun_phrases("Two dogs near the small brown cat", max_phrases=1) == ["dogs"]
    assert noun_phrases("Sunset over the hills") == ["hills"]  # fallback: no lexicon noun needed
    assert noun_phrases("") == []


def test_select_detections_threshold_nms_normalise() -> None:
    raw = [("red ellipse", [10, 10, 110, 90], 0.9), ("red ellipse", [12, 10, 112, 92], 0.8),
           ("red ellipse", [300, 10, 390, 90], 0.4), ("blue triangle", [-20, 50, 100, 400], 0.7),
           ("blue triangle", [500, 500, 600, 600], 0.99), (" ", [0, 0, 10, 10], 0.99),
           ("red ellipse", [0, 0, 50, 50], 0.1)]
    dets = select_detections(raw, ["blue triangle", "red ellipse"], 400, 200, threshold=0.3)
    assert [(d["label"], d["score"]) for d in dets] == [("blue triangle", 0.7), ("red ellipse", 0.9),
                                                        ("red ellipse", 0.4)]
    assert dets[0]["box"] == [0.0, 0.25, 0.25, 1.0]  # clipped into the image
    assert dets[1]["box"] == [0.025, 0.05, 0.275, 0.45]


@pytest.fixture(scope="module")
def demo_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vila2_curate.pipelines.demo.detector import build_demo_detector

    return build_demo_detector(tmp_path_factory.mktemp("owl") / "owlv2-demo", seed=0)


def _shape_rows() -> list[dict]:
    img = Image.new("RGB", (320, 240), "white")
    d = ImageDraw.Draw(img)
    d.ellipse([20, 30, 120, 110], fill=(220, 30, 35))
    d.rectangle([180, 120, 300, 220], fill=(30, 70, 210))
    return [{"image": _png(img), "text": "A red ellipse and a blue rectangle on a plain background"},
            {"image": _png(img), "text": "orig", "captions": [
                {"round": 1, "model": "m", "prompt_id": "p", "params_hash": "h", "created_at": "t",
                 "text": "A purple triangle next to a dog", "flags": []}]},
            {"image": b"broken", "text": "a red ellipse"},
            {"image": _png(img), "text": "the of and"}]


def test_grounding_demo_detector_production_path(demo_detector: Path) -> None:
    for threshold in (0.0, 0.5):
        stage = GroundingStage(GroundingConfig(model=str(demo_detector), box_threshold=threshold))
        out = stage(_table(_shape_rows()))
        specs = out.column("specialists").to_pylist()
        phrases = [["red ellipse", "blue rectangle"], ["purple triangle", "dog"]]
        for spec, ph in zip(specs[:2], phrases, strict=True):
            dets = spec["grounding"]
            assert isinstance(dets, list)
            for d in dets:
                assert d["label"] in ph and d["score"] >= threshold
                x0, y0, x1, y1 = d["box"]
                assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            for lab in ph:
                same = [d["box"] for d in dets if d["label"] == lab]
                assert len(same) <= 3
                assert all(g.iou(a, b) <= 0.5 for i, a in enumerate(same) for b in same[i + 1:])
            assert spec["grounding_text"].count("[") == len(dets)
            tag = json.loads(spec["models"])["grounding"]
            assert tag.endswith("|demo") and str(demo_detector) in tag
        assert out.column("drop_reason")[2].as_py().startswith("image_undecodable")
        assert specs[3]["grounding"] == [] and specs[3]["grounding_text"] == ""


def test_three_stages_keep_each_others_fields(ocr_run: dict, demo_detector: Path) -> None:
    k = ocr_run["n_sample"]
    ocr = ocr_run["out"].slice(k, 1)  # the rendered-text row, already through OCR
    grounded = GroundingStage(GroundingConfig(model=str(demo_detector), box_threshold=0.0))(ocr)
    final = SpatialStage(SpatialConfig())(grounded)
    a, b, c = (t.column("specialists")[0].as_py() for t in (ocr, grounded, final))
    assert b["ocr"] == a["ocr"] and b["ocr_text"] == a["ocr_text"] and "FRESH" in a["ocr_text"]
    assert c["ocr"] == a["ocr"] and c["grounding"] == b["grounding"] and c["grounding_text"] == b["grounding_text"]
    assert set(json.loads(c["models"])) == {"ocr", "grounding", "spatial"}
    again = GroundingStage(GroundingConfig(model=str(demo_detector), box_threshold=0.0))(final)
    assert again.column("specialists")[0].as_py()["spatial"] == c["spatial"]  # re-running one keeps the rest


# -- VLM prompts -------------------------------------------------------------------------------------------
class _FakeVlm:
    def __init__(self, cfg, prompt_set) -> None:
        self.prompt_set = prompt_set

    def setup(self) -> None:
        pass

    def model_tag(self) -> str:
        return "fake-vlm|prompts:spatial@0"

    def ask(self, images, keys):
        from vila2_curate.specialists.vlm import VlmAnswer

        return [VlmAnswer(error="boom") if k == "k1" else VlmAnswer(text="The dog sits left of the cat.")
                for k in keys]


def test_spatial_vlm_prompt_appended_with_marker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vila2_curate.specialists.spatial.VlmPrompter", _FakeVlm)
    img = _png(Image.new("RGB", (64, 64), "white"))
    spec = {"grounding": [{"label": "dog", "box": [0, 0, 0.3, 0.3], "score": 0.9},
                          {"label": "cat", "box": [0.6, 0.6, 0.9, 0.9], "score": 0.9}]}
    stage = SpatialStage(SpatialConfig(vlm=CaptionerConfig(model="fake")))
    out = stage(_table([{"image": img, "specialists": spec}, {"image": img, "specialists": spec}]))
    s0 = out.column("specialists")[0].as_py()
    tool, vlm = split_vlm_text(s0["spatial_text"])
    assert f"\n{VLM_MARKER} " in s0["spatial_text"] and vlm == "The dog sits left of the cat."
    assert tool.startswith("The dog is left of the cat.")
    assert json.loads(s0["models"])["spatial_vlm"] == "fake-vlm|prompts:spatial@0"
    assert out.column("drop_reason")[1].as_py() == "spatial_vlm_failed: boom"


def test_vlm_prompter_asks_through_the_recaption_api() -> None:
    """``VlmPrompter`` against a loopback OpenAI-compatible server, through recaption's backend: each image
    is asked the prompt recaption's per-sample choice gives its key, answers are cleaned by recaption's
    caption clean-up, a refusal, an empty answer or a sample's own error becomes that sample's error, and
    an outage fails the call."""
    ocr = load_prompt_set("ocr")
    seed = 3
    keys = [f"k{i}" for i in range(8)]
    assert {ocr.choose(seed, k)[1] for k in keys} == set(ocr.prompts)  # both prompts are in play

    def prompt_of(body: dict) -> str:
        content = body["messages"][0]["content"]
        assert content[0]["type"] == "image_url" and content[0]["image_url"]["url"].startswith("data:image/")
        return content[-1]["text"]

    def looping_answer(body: dict, n: int) -> tuple[int, dict, float]:  # names the prompt it was asked
        sentence = f"Prompt {ocr.prompts.index(prompt_of(body))} reads OPEN."
        return 200, chat_completion(f"  {sentence} {sentence} {sentence}  "), 0.0

    srv = ChatCompletionsServer(looping_answer)
    try:
        cfg = CaptionerConfig(backend="openai", model="served/nvila-8b", base_url=srv.url,
                              api_key_env="VILA2_TEST_UNSET_KEY", max_retries=0, timeout_s=10.0,
                              generation=GenerationParams(seed=seed))
        vlm = VlmPrompter(cfg, "ocr")
        assert vlm.model_tag() == f"nvila-8b|prompts:ocr@{ocr.hash}"
        assert vlm.ask([], []) == []
        images = [Image.new("RGB", (32, 24), (40 * i, 90, 160)) for i in range(len(keys))]
        answers = vlm.ask(images, keys)
        assert len(srv.bodies) == len(keys)
        for key, answer in zip(keys, answers, strict=True):
            expected = f"Prompt {ocr.prompts.index(ocr.choose(seed, key)[1])} reads OPEN."
            assert (answer.text, answer.error, answer.flags) == (expected, None, ["repetition_removed"]), key

        srv.behave = lambda body, n: (200, chat_completion("I'm sorry, I cannot read text in images."), 0.0)
        [refused] = vlm.ask(images[:1], keys[:1])
        assert (refused.text, refused.error) == ("", "vlm answer rejected: refusal")
        srv.behave = lambda body, n: (200, chat_completion("  ...  "), 0.0)
        assert vlm.ask(images[:1], keys[:1])[0].error == "vlm answer rejected: empty"
        srv.behave = lambda body, n: (400, {"error": "cannot read image"}, 0.0)
        [failed] = vlm.ask(images[:1], keys[:1])
        assert failed.text == "" and failed.error.startswith("http 400")
        srv.behave = lambda body, n: (503, {"error": "overloaded"}, 0.0)
        with pytest.raises(CaptionerUnavailable):
            vlm.ask(images[:1], keys[:1])
    finally:
        srv.close()


# -- sidecars ------------------------------------------------------------------------------------------------
def test_specialist_texts_follow_vila_sidecar_kinds() -> None:
    row = {"text": "A red ellipse and a blue triangle on a plain background", "captions": [],
           "specialists": {
               "ocr_text": "OPEN MUSEUM\nPARKING", "grounding_text": "x",
               "grounding": [{"label": "red ellipse", "box": [0.1, 0.2, 0.3, 0.4], "score": 0.9},
                             {"label": "blue triangle", "box": [0.5, 0.5, 0.9, 0.95], "score": 0.8},
                             {"label": "dog", "box": [0.0, 0.0, 0.1, 0.1], "score": 0.5}],
               "spatial_text": f"The red ellipse is left of the blue triangle.\n{VLM_MARKER} A detailed view."}}
    t = specialist_texts(row)
    assert t["ocr"] == 'The text in the image reads: "OPEN MUSEUM", "PARKING".'
    assert t["spatial"] == "A detailed view. The red ellipse is left of the blue triangle."
    assert t["bbox_interleaved"] == ("A red ellipse [0.10, 0.20, 0.30, 0.40] and a blue triangle "
                                     "[0.50, 0.50, 0.90, 0.95] on a plain background. Objects: dog "
                                     "[0.00, 0.00, 0.10, 0.10].")
    assert specialist_texts({"text": "x", "specialists": None}) == {}
    assert bbox_interleaved_answer("cat", []) == ""
    # VILA picks the question by substring, "spatial" first: each folder must hold exactly one keyword
    for kind, folder in SIDECAR_DIRS.items():
        assert [k for k in ("spatial", "ocr", "bbox_interleaved") if k in folder] == [kind]
