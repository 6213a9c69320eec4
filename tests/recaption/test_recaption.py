"""Recaption: tiny random LLaVA through the production loader, lineage, quarantine, prompts, clean-up,
the OpenAI-compatible client against a loopback server, and the VLM DeltaLoss scorer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from tests.helpers.loopback_http import ChatCompletionsServer, chat_completion
from vila2_curate.pipelines.demo.vlm import build_demo_vlm
from vila2_curate.recaption.backends import CaptionerUnavailable, RemoteCodeRequired
from vila2_curate.recaption.backends.openai_client import OpenAICaptioner
from vila2_curate.recaption.backends.transformers_vlm import TransformersCaptioner, resolve_model_class
from vila2_curate.recaption.postprocess import clean_caption
from vila2_curate.recaption.prompts import load_prompt_set, parse_prompt_set
from vila2_curate.recaption.stage import RecaptionStage
from vila2_curate.schemas.config import (
    CaptionerConfig,
    DeltaLossConfig,
    GenerationParams,
    ModelRuntime,
    RecaptionConfig,
)
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, PAIR_SCHEMA, make_table

RUN_STARTED = "2025-03-01T12:00:00Z"


@pytest.fixture(scope="module")
def demo_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_vlm(tmp_path_factory.mktemp("vlm"), seed=0)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (30 + 9 * i, 44, 3), dtype=np.uint8)) for i in range(n)]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pairs(n: int, bad: set[int] = frozenset()) -> pa.Table:
    rows = []
    for i, img in enumerate(_images(n)):
        rows.append(
            {
                "key": f"k{i:03d}",
                "source": "coyo",
                "shard": "s0",
                "url": f"http://x/{i}.png",
                "image": b"definitely not an image" if i in bad else _png(img),
                "text": f"alt text {i}",
                "captions": [
                    {
                        "round": 0,
                        "model": "original",
                        "prompt_id": "",
                        "params_hash": "",
                        "text": f"alt text {i}",
                        "created_at": RUN_STARTED,
                        "flags": [],
                    }
                ],
            }
        )
    return make_table(rows, PAIR_SCHEMA)


def _captioner_cfg(model: Path, **gen) -> CaptionerConfig:
    return CaptionerConfig(
        model=str(model),
        runtime=ModelRuntime(batch_size=4),
        generation=GenerationParams(max_new_tokens=8, **gen),
    )


@pytest.fixture(scope="module")
def stage(demo_vlm: Path) -> RecaptionStage:
    st = RecaptionStage(
        RecaptionConfig(round=1, captioner=_captioner_cfg(demo_vlm)), run_started_at=RUN_STARTED
    )
    st.setup()
    return st


# -- transformers backend ------------------------------------------------------------------------------
def test_batched_left_padded_generation_equals_per_sample(stage: RecaptionStage) -> None:
    cap: TransformersCaptioner = stage.backend
    assert cap.tokenizer.padding_side == "left" and cap.identity["demo"] is True
    images = _images(6)
    prompts = ["Describe the image.", "What is in this picture? Explain what you see.", "Describe."] * 2
    batched = cap.generate(images, prompts)
    single = [cap.generate([im], [p])[0] for im, p in zip(images, prompts, strict=True)]
    assert batched == single
    assert all(r.error is None and 0 <= r.n_generated_tokens <= 8 for r in batched)
    assert any(r.hit_max_tokens for r in batched)  # random weights rarely hit EOS within 8 tokens
    rendered = cap._render("Describe the image.", True)
    assert "<image>" in rendered and rendered.endswith("ASSISTANT:")


def test_images_downscaled_to_max_side() -> None:
    from vila2_curate.recaption.runtime import load_image

    big = Image.new("RGB", (3000, 1000), (10, 200, 30))
    out = load_image(_png(big), 512)
    assert out.size == (512, 171) and out.mode == "RGB"


def test_remote_code_refused_without_trust(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "totally_custom_vlm", "auto_map": {"AutoModel": "modeling_custom.CustomVLM"}}
        )
    )
    with pytest.raises(RemoteCodeRequired, match="trust_remote_code"):
        resolve_model_class(str(tmp_path), trust_remote_code=False)


# -- stage ---------------------------------------------------------------------------------------------
def test_stage_appends_lineage_and_rerun_is_a_no_op(stage: RecaptionStage, demo_vlm: Path) -> None:
    table = _pairs(5)
    out = stage(table)
    assert stage.name == "recaption_r1" and stage.resources.gpus == 0
    ps = load_prompt_set("self_augment")
    for key, caps in zip(out.column("key").to_pylist(), out.column("captions").to_pylist(), strict=True):
        assert len(caps) == 2 and caps[0]["round"] == 0  # round 0 kept untouched, round 1 appended
        new = caps[1]
        assert new["round"] == 1 and new["model"] == demo_vlm.name
        assert new["prompt_id"] == ps.choose(0, key)[0]
        assert new["params_hash"] == stage.params_hash and new["created_at"] == RUN_STARTED
        assert "demo_model" in new["flags"]
    assert out.column("drop_reason").null_count == out.num_rows
    assert stage(out).equals(out)  # rerun: nothing appended twice
    # a second round appends after the first, never overwriting it
    r2 = RecaptionStage(
        RecaptionConfig(round=2, captioner=_captioner_cfg(demo_vlm)), run_started_at=RUN_STARTED
    )
    r2.backend, r2.demo = stage.backend, stage.demo  # share the loaded model
    out2 = r2(out)
    for before, after in zip(
        out.column("captions").to_pylist(), out2.column("captions").to_pylist(), strict=True
    ):
        assert after[:2] == before and after[2]["round"] == 2


def test_stage_output_is_deterministic_across_instances(stage: RecaptionStage, demo_vlm: Path) -> None:
    other = RecaptionStage(RecaptionConfig(round=1, captioner=_captioner_cfg(demo_vlm)))
    other.run_started_at = RUN_STARTED  # what the engine sets on resume
    other.backend, other.demo = stage.backend, stage.demo
    table = _pairs(3)
    assert other(table).equals(stage(table))


def test_quarantine_undecodable_image_and_failing_sample(
    stage: RecaptionStage, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = _pairs(5, bad={1})
    real = stage.backend._generate_batch

    def flaky(images, prompts, ids, min_new_tokens):
        if "k003" in ids:
            raise RuntimeError("model blew up on this sample")
        return real(images, prompts, ids, min_new_tokens)

    monkeypatch.setattr(stage.backend, "_generate_batch", flaky)
    out = stage(table)
    reasons = out.column("drop_reason").to_pylist()
    assert reasons[1].startswith("image_undecodable:")
    assert reasons[3] == "recaption_failed: RuntimeError: model blew up on this sample"
    assert out.column("quarantined").to_pylist() == [None, True, None, True, None]
    assert out.column("drop_stage").to_pylist()[1] == "recaption_r1"
    caps = out.column("captions").to_pylist()
    assert [len(c) for c in caps] == [2, 1, 2, 1, 2]  # the others captioned despite the failures


def test_documents_pass_through(stage: RecaptionStage) -> None:
    docs = make_table(
        [{"key": "d1", "source": "mmc4", "shard": "s", "text_list": ["a", "b"]}], DOCUMENT_SCHEMA
    )
    assert stage(docs) is docs


def test_stage_pickles_without_model(stage: RecaptionStage) -> None:
    import pickle

    clone = pickle.loads(pickle.dumps(stage))
    assert clone.backend is None and clone.run_started_at == RUN_STARTED and clone.name == stage.name


# -- prompts -------------------------------------------------------------------------------------------
def test_prompt_sets_hash_and_deterministic_choice(tmp_path: Path) -> None:
    names = {"self_augment", "spatial", "ocr", "grounding"}
    sets = {n: load_prompt_set(n) for n in names}
    assert len({s.hash for s in sets.values()}) == 4 and all(len(s.hash) == 12 for s in sets.values())
    sa = sets["self_augment"]
    assert len(sa.prompts) >= 4 and "[xmin, ymin, xmax, ymax]" in sets["grounding"].prompts[0]
    assert [sa.choose(7, f"key{i}") for i in range(50)] == [
        load_prompt_set("self_augment").choose(7, f"key{i}") for i in range(50)
    ]
    assert len({sa.choose(0, f"key{i}")[1] for i in range(200)}) == len(sa.prompts)  # every phrasing used
    assert [sa.choose(0, f"k{i}") for i in range(20)] != [sa.choose(1, f"k{i}") for i in range(20)]
    # the hash is of the content, not the formatting; any edit to a prompt changes it
    path = tmp_path / "mine.yaml"
    path.write_text(
        "# comment\nname: self_augment\ndescription: "
        + json.dumps(sa.description)
        + "\nprompts:\n"
        + "".join(f"  - {json.dumps(p)}\n" for p in sa.prompts)
    )
    assert load_prompt_set(path).hash == sa.hash
    edited = parse_prompt_set(
        {
            "name": "self_augment",
            "description": sa.description,
            "prompts": [*sa.prompts[:-1], sa.prompts[-1] + "!"],
        }
    )
    assert edited.hash != sa.hash
    with pytest.raises(FileNotFoundError, match="built-in"):
        load_prompt_set("no_such_set")


# -- post-processing -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "hit_max", "text", "flags"),
    [
        (
            "A dog on a beach. The sky is blue. A dog on a beach. The sun sets.",
            False,
            "A dog on a beach. The sky is blue. The sun sets.",
            ["repetition_removed"],
        ),
        (
            "A red car parked on a street. A red car, a red car, a red car, a red car, a red ca",
            True,
            "A red car parked on a street. A red car.",
            ["repetition_removed"],
        ),
        ("The the the the the cat sleeps.", False, "The cat sleeps.", ["repetition_removed"]),
        ("A very very tall tree.", False, "A very very tall tree.", []),
        (
            "A man in a red jacket walks along the river towards the old",
            True,
            "A man in a red jacket walks along the river towards the old",
            ["truncated"],
        ),
        (
            "I'm sorry, but I cannot describe this image.",
            False,
            "I'm sorry, but I cannot describe this image.",
            ["refusal"],
        ),
        (
            "As an AI, I do not have the ability to see images.",
            False,
            "As an AI, I do not have the ability to see images.",
            ["refusal"],
        ),
        ("", False, "", ["empty"]),
        ("  ...  ", False, "...", ["empty"]),
        (
            "person: [0.1, 0.2, 0.5, 0.9]\ncar: [0.5, 0.5, 0.9, 0.9]\nperson: [0.1, 0.2, 0.5, 0.9]",
            False,
            "person: [0.1, 0.2, 0.5, 0.9]\ncar: [0.5, 0.5, 0.9, 0.9]",
            ["repetition_removed"],
        ),
    ],
)
def test_postprocess(raw: str, hit_max: bool, text: str, flags: list[str]) -> None:
    assert clean_caption(raw, hit_max) == (text, flags)


# -- OpenAI-compatible client --------------------------------------------------------------------------
def _client(url: str, **kw) -> OpenAICaptioner:
    cfg = CaptionerConfig(
        backend="openai",
        model="nvila-8b",
        base_url=url,
        api_key_env="VILA2_TEST_KEY",
        **{"max_retries": 3, "timeout_s": 5.0, **kw},
    )
    return OpenAICaptioner(cfg, backoff_base_s=0.01, backoff_max_s=0.05)


def test_openai_client_retries_429_then_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VILA2_TEST_KEY", "sk-test")
    srv = ChatCompletionsServer(
        lambda body, n: (429, {"error": "slow down"}, 0) if n == 1 else (200, chat_completion("A cat."), 0))
    try:
        client = _client(srv.url)
        [res] = client.generate(_images(1), ["Describe."], sample_ids=["k1"])
        assert res.text == "A cat." and res.n_generated_tokens == 5 and not res.hit_max_tokens
        assert client.stats == {"requests": 2, "retries": 1}
        body = srv.bodies[-1]
        content = body["messages"][0]["content"]
        assert content[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
        assert content[1] == {"type": "text", "text": "Describe."} and body["temperature"] == 0.0
        assert srv.headers[-1]["Authorization"] == "Bearer sk-test"
        client.close()
    finally:
        srv.close()


def test_openai_client_timeout_retry_length_and_sample_errors() -> None:
    def behave(body, n):
        prompt = body["messages"][0]["content"][-1]["text"]
        if prompt == "slow-once":
            return 200, chat_completion("late"), (1.0 if n == 1 else 0)
        if prompt == "bad":
            return 400, {"error": "cannot read image"}, 0
        return 200, chat_completion("cut", finish="length", tokens=8), 0

    srv = ChatCompletionsServer(behave)
    try:
        client = _client(srv.url, timeout_s=0.3, max_concurrency=1)
        res = client.generate(_images(3), ["slow-once", "bad", "long"], sample_ids=["a", "b", "c"])
        assert res[0].text == "late" and res[0].error is None
        assert res[1].error.startswith("http 400")
        assert res[2].hit_max_tokens and res[2].n_generated_tokens == 8
        client.close()
        never = _client(srv.url, timeout_s=0.2, max_retries=1)
        srv.behave = lambda body, n: (200, chat_completion("never"), 1.0)
        with pytest.raises(CaptionerUnavailable, match="giving up after 2 attempts"):
            never.generate(_images(1), ["x"])
        never.close()
    finally:
        srv.close()


def test_openai_client_bounds_concurrency() -> None:
    srv = ChatCompletionsServer(lambda body, n: (200, chat_completion(f"caption {n}"), 0.1))
    try:
        client = _client(srv.url, max_concurrency=2)
        res = client.generate(_images(8), ["Describe."] * 8)
        assert len(res) == 8 and all(r.error is None for r in res)
        assert srv.max_inflight == 2
        client.close()
    finally:
        srv.close()


# -- VLM DeltaLoss -------------------------------------------------------------------------------------
def test_vlm_deltaloss_matches_hand_computation(demo_vlm: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vila2_curate.recaption.deltaloss_vlm import SCORING_PROMPT, VlmDeltaLossScoreStage

    large = build_demo_vlm(tmp_path / "large", seed=1)
    cfg = DeltaLossConfig(
        small_model=str(demo_vlm), large_model=str(large), scorer="vlm", runtime=ModelRuntime(batch_size=4)
    )
    st = VlmDeltaLossScoreStage(cfg)
    table = _pairs(3, bad={2})
    caps = table.column("captions").to_pylist()
    caps[0].append(
        {
            "round": 1,
            "model": "m",
            "prompt_id": "p",
            "params_hash": "h",
            "text": "A dog runs on the beach.",
            "created_at": RUN_STARTED,
            "flags": [],
        }
    )
    table = table.set_column(
        table.schema.get_field_index("captions"),
        "captions",
        pa.array(caps, type=table.schema.field("captions").type),
    )
    out = st(table)
    assert st.name == "deltaloss_score"
    assert out.column("drop_reason").to_pylist()[2].startswith("image_undecodable:")
    small, lg, delta = (out.column(c).to_pylist() for c in ("logp_small", "logp_large", "delta_loss"))
    assert delta[0] == pytest.approx(lg[0] - small[0], abs=1e-5) and small[2] is None

    # by hand, for row 0: one unpadded forward pass, mean log p of the caption's tokens
    proc = AutoProcessor.from_pretrained(str(demo_vlm))
    model = AutoModelForImageTextToText.from_pretrained(str(demo_vlm), dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SCORING_PROMPT}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    n_prompt = len(proc.tokenizer(prompt)["input_ids"])
    full = prompt + " A dog runs on the beach."
    n_text = len(proc.tokenizer(full)["input_ids"]) - n_prompt
    inputs = proc(images=[_images(1)[0]], text=[full], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    ids = inputs["input_ids"][0]
    lp = logits[:-1].log_softmax(-1).gather(-1, ids[1:, None]).squeeze(-1)[-n_text:]
    assert small[0] == pytest.approx(float(lp.mean()), abs=1e-4)

    # a row's score does not depend on its batch
    alone = st(table.slice(0, 1))
    assert alone.column("logp_small").to_pylist()[0] == pytest.approx(small[0], abs=1e-5)
