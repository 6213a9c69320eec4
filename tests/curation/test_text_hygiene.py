"""Caption hygiene: the hostile captions the sample generator plants come out clean in
the trainer's .txt, every change is counted in stats.json, empty captions are dropped before dedup, MMC4
sentences keep their indices, and the same cleaner runs on recaption and specialist text."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from tests.helpers.runs import write_config
from vila2_curate.curation.text_hygiene import EMPTY_AFTER, EMPTY_INPUT, CaptionHygieneStage
from vila2_curate.pipelines.engine.plan import build_plan
from vila2_curate.pipelines.executors.local import run_local
from vila2_curate.pipelines.io.readers import make_reader
from vila2_curate.pipelines.validate import read_vila_samples, validate_output
from vila2_curate.recaption.postprocess import clean_caption as clean_generation
from vila2_curate.schemas.config import CaptionHygieneConfig, load_config
from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table
from vila2_curate.schemas.text_hygiene import clean_caption, cut_at_sentence
from vila2_curate.specialists.sidecar import specialist_texts

STAGES = [{"type": "normalize"}, {"type": "caption_hygiene"}, {"type": "dedup", "methods": ["exact"]}]


@pytest.fixture(scope="module")
def truth(sample_dir: Path) -> dict:
    return json.loads((sample_dir / "ground_truth.json").read_text())


@pytest.fixture(scope="module")
def hostile(truth: dict) -> dict[str, dict]:
    recs = {r["key"]: r for r in truth["records"] if r.get("hostile_caption")}
    assert len(recs) == 6
    return recs


@pytest.fixture(scope="module")
def run(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """normalize -> caption_hygiene -> dedup over the sample's img2dataset shards."""
    tmp = tmp_path_factory.mktemp("hygiene")
    cfg = write_config(sample_dir, tmp / "out", tmp / "run.yaml", stages=STAGES)
    config = load_config(cfg)
    config = config.model_copy(update={"sources": [s for s in config.sources if s.name == "img2dataset"]})
    run_local(config, progress=False)
    return tmp / "out"


def test_hostile_sample_captions_clean_to_what_was_meant(hostile: dict[str, dict]):
    cfg = CaptionHygieneConfig()
    for rec in hostile.values():
        out = clean_caption(rec["caption"], cfg)
        kind = rec["hostile_caption"]
        if kind == "long_caption":
            assert len(rec["caption"]) > 5000 and len(out.text) <= cfg.max_chars
            assert rec["caption_intended"].startswith(out.text) and out.text.endswith(".")
            assert out.changes == {"cut_long": 1}
        else:
            assert out.text == rec["caption_intended"], kind
        expected = {"control_chars": {"control_chars", "whitespace"},
                    "invisible_chars": {"bom", "bidi_controls", "zero_width"},
                    "special_tokens": {"special_tokens"}, "mojibake": {"mojibake"},
                    "replacement_char": {"replacement_char"}, "long_caption": {"cut_long"}}[kind]
        assert set(out.changes) == expected, (kind, out.changes)
        assert clean_caption(out.text, cfg).changes == {}  # idempotent


def test_special_tokens_cannot_reassemble():
    # removing the inner token must not leave a new one; invisible characters go before tokens are matched
    for text in ("<im<image>age> a dog", "<ima\u200bge> a dog", "<vid\x00eo> a dog", "<|im_start|>a dog<|im_end|>",
                 "a dog </s>"):
        out = clean_caption(text).text
        assert "<image>" not in out and "<video>" not in out and "<|" not in out and "</s>" not in out, out
        assert out.endswith("a dog")
    assert clean_caption("x <tok> y", CaptionHygieneConfig(special_tokens=["<tok>"])).text == "x y"
    assert clean_caption("Tom &amp; Jerry", CaptionHygieneConfig(fix_mojibake=False)).text == "Tom &amp; Jerry"


def test_cut_at_sentence_boundary():
    text = "First sentence here. Second one is longer than that. Third."
    assert cut_at_sentence(text, 55) == "First sentence here. Second one is longer than that."
    assert cut_at_sentence("word " * 20, 22) == "word word word word"  # no sentence end: a word boundary
    assert clean_caption("One.\nTwo  lines", keep_newlines=True).text == "One.\nTwo lines"


def test_pipeline_writes_clean_txt_and_counts_changes(run: Path, hostile: dict[str, dict]):
    assert validate_output(str(run)) == []
    seen = {}
    for s in read_vila_samples(str(run)):
        txt = s[".txt"]
        assert not any(c in txt for c in ("\x00", "\x7f", "\ufffd", "\ufeff", "\u200b", "\u202e")), s["__key__"]
        assert "<image>" not in txt and "<|" not in txt
        key = s[".json"].get("source_key") or s["__key__"]
        if key in hostile:
            seen[hostile[key]["hostile_caption"]] = (txt, s[".json"]["flags"])
    assert set(seen) == set(hostile[k]["hostile_caption"] for k in hostile)
    by_kind = {r["hostile_caption"]: r for r in hostile.values()}
    for kind, (txt, flags) in seen.items():
        if kind != "long_caption":
            assert txt == by_kind[kind]["caption_intended"]
        assert any(f.startswith("caption_hygiene:") for f in flags), kind
    counters = json.loads((run / "stats.json").read_text())["sources"]["img2dataset"]["counters"]
    hyg = {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("caption_hygiene.")}
    assert hyg == {"bidi_controls": 1, "bom": 1, "control_chars": 1, "cut_long": 1, "mojibake": 1,
                   "replacement_char": 1, "special_tokens": 1, "whitespace": 1, "zero_width": 1}


def _pair_rows(sample_dir: Path, n: int) -> pa.Table:
    cfg = load_config(write_config(sample_dir, sample_dir / "unused", sample_dir / "h.yaml"))
    reader = make_reader(next(s for s in cfg.sources if s.name == "coyo_bytes"))
    batch = next(iter(reader.read(reader.list_shards()[0], 64)))
    return batch.filter(pa.compute.is_null(batch.column("drop_reason"))).slice(0, n)


def test_empty_caption_is_dropped_before_dedup_unless_a_recaption_follows(sample_dir: Path):
    rows = _pair_rows(sample_dir, 3).to_pylist()
    rows[0]["text"], rows[1]["text"] = "<image> \u200b", ""
    table = make_table(rows, PAIR_SCHEMA)
    out = CaptionHygieneStage()(table).to_pylist()
    assert [r["drop_reason"] for r in out] == [EMPTY_AFTER, EMPTY_INPUT, None]
    assert out[0]["drop_stage"] == "caption_hygiene" and not out[0]["quarantined"]
    assert "caption_hygiene:empty_after_hygiene" in out[0]["flags"]

    # the planner tells the stage whether a recaption stage follows in the same run
    captioner = {"model": str(sample_dir / "models" / "vlm")}
    base = load_config(write_config(sample_dir, sample_dir / "unused", sample_dir / "h.yaml"))
    with_rc = base.model_copy(update={"stages": [CaptionHygieneConfig(), *_recaption(captioner)]})
    stage = build_plan(with_rc).segments[0].maps[0]
    assert isinstance(stage, CaptionHygieneStage) and stage.recaption_follows
    assert [r["drop_reason"] for r in stage(table).to_pylist()] == [None, None, None]
    alone = build_plan(base.model_copy(update={"stages": [CaptionHygieneConfig()]})).segments[0].maps[0]
    assert not alone.recaption_follows


def _recaption(captioner: dict) -> list:
    from vila2_curate.schemas.config import RecaptionConfig

    return [RecaptionConfig.model_validate({"type": "recaption", "captioner": captioner})]


def test_mmc4_sentences_keep_their_indices(sample_dir: Path):
    cfg = load_config(write_config(sample_dir, sample_dir / "unused", sample_dir / "h.yaml"))
    reader = make_reader(next(s for s in cfg.sources if s.name == "mmc4"))
    docs = next(iter(reader.read(reader.list_shards()[0], 8)))
    rows = docs.to_pylist()
    doc = next(r for r in rows if r["drop_reason"] is None and len(r["text_list"]) >= 2)
    original = list(doc["text_list"])
    doc["text_list"] = ["<image>", original[1] + "\x00\ufffd", *original[2:]]
    out = CaptionHygieneStage()(make_table([doc], docs.schema)).to_pylist()[0]
    assert out["drop_reason"] is None
    assert out["text_list"] == ["", original[1], *original[2:]]  # emptied sentence kept as "": indices hold
    metrics = json.loads(out["run_metrics"])["counters"]
    assert metrics["caption_hygiene.special_tokens"] == 1 and metrics["caption_hygiene.control_chars"] == 1
    assert metrics["caption_hygiene.replacement_char"] == 1


def test_same_cleaner_on_recaption_and_specialist_text(hostile: dict[str, dict]):
    rec = next(r for r in hostile.values() if r["hostile_caption"] == "control_chars")
    out = clean_generation(rec["caption"] + "\n<image>")
    assert out.text == rec["caption_intended"]
    assert {"caption_hygiene:control_chars", "caption_hygiene:special_tokens"} <= set(out.flags)
    row = {"text": "A shop sign", "captions": [],
           "specialists": {"ocr_text": "OPEN <image>\x00\nDAILY", "spatial_text": "a \u202eleft of b"}}
    texts = specialist_texts(row)
    assert texts["ocr"] == 'The text in the image reads: "OPEN", "DAILY".'
    assert texts["spatial"] == "a left of b"


def test_ascii_fast_path_skips_only_what_ftfy_would_not_change(truth: dict):
    """clean_caption skips ftfy for ASCII text without '&' or ESC; on every caption of the sample (and
    a few ASCII edge cases) ftfy with the same settings indeed changes nothing there."""
    import ftfy

    from vila2_curate.schemas.text_hygiene import _FTFY

    cfg = _FTFY._replace(explain=False)
    texts = [r["caption"] for r in truth["records"] if r.get("caption")]
    texts += ["A&B", "x \x1b[1m y", "plain ascii, quotes \"x\" and 'y'", "fi fl ff -- ..."]
    skipped = [t for t in texts if t.isascii() and "&" not in t and "\x1b" not in t]
    assert len(skipped) > 50
    assert all(ftfy.fix_text(t, cfg) == t for t in skipped)


def test_interrupted_run_resumes_to_the_same_counts_and_rounds(run: Path, sample_dir: Path, tmp_path: Path):
    """Hygiene counts and round sums live in the shard markers: a resumed run writes the same stats.json and
    summaries.json as the uninterrupted one."""
    cfg = write_config(sample_dir, tmp_path / "out", tmp_path / "run.yaml", stages=STAGES)
    config = load_config(cfg)
    config = config.model_copy(update={"sources": [s for s in config.sources if s.name == "img2dataset"]})
    with pytest.raises(InterruptedError):
        run_local(config, progress=False, max_shards=3)  # segment 0 done, one shard of the last segment
    run_local(config, progress=False)
    for name in ("stats.json", "summaries.json"):
        assert (tmp_path / "out" / name).read_bytes() == (run / name).read_bytes(), name
    assert "rounds" in json.loads((run / "summaries.json").read_text())


def test_recaption_stage_cleans_what_the_model_emits(sample_dir: Path):
    """A VLM (here an OpenAI-compatible loopback server) answering with NUL, an image token and U+FFFD: the
    caption record holds the clean text, flags say what was removed, stats get recaption_hygiene counts."""
    from tests.helpers.loopback_http import ChatCompletionsServer, chat_completion
    from vila2_curate.recaption.stage import RecaptionStage
    from vila2_curate.schemas.config import RecaptionConfig

    srv = ChatCompletionsServer(lambda body, n: (200, chat_completion("A dog\x00 on <image> grass \ufffd."), 0))
    try:
        cfg = RecaptionConfig.model_validate({"type": "recaption", "round": 1, "captioner": {
            "backend": "openai", "model": "served-vlm", "base_url": srv.url, "max_retries": 0}})
        stage = RecaptionStage(cfg)
        out = stage(_pair_rows(sample_dir, 3)).to_pylist()
    finally:
        srv.close()
    for row in out:
        (cap,) = row["captions"]
        assert cap["text"] == "A dog on grass ."
        assert {"caption_hygiene:control_chars", "caption_hygiene:special_tokens",
                "caption_hygiene:replacement_char"} <= set(cap["flags"])
        counters = json.loads(row["run_metrics"])["counters"]
        assert counters == {"recaption_hygiene.control_chars": 1, "recaption_hygiene.special_tokens": 1,
                            "recaption_hygiene.replacement_char": 1}
