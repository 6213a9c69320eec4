"""The GPU check (benchmarks/gpu/): its CPU run with the tiny demo models writes every figure, the
full-size random models have the real models' shapes, and the offline installer's plan."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import ROOT

GPU = ROOT / "benchmarks" / "gpu"
STAGES = ["clipscore", "recaption", "grounding", "deltaloss"]


def _bootstrap():
    spec = importlib.util.spec_from_file_location("gpucheck_bootstrap", GPU / "gpucheck" / "bootstrap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_tiny_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(GPU / "run_gpu_check.py"), str(out), "--device", "cpu", "--tiny",
           "--budget-s", "240"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    doc = json.loads((out / "gpu_check.json").read_text())
    assert [s["stage"] for s in lines] == [s["stage"] for s in doc["stages"]] == STAGES
    assert doc["tiny"] is True and doc["demo"] is True and doc["errors"] == [] and doc["skipped"] == []
    assert doc["host"]["device"] == "cpu" and doc["wall_s"] > 0
    for rec in doc["stages"]:
        assert rec["demo"] is True and "random weights" in rec["model"]
        assert rec["items_per_s"] > 0 and rec["bare_items_per_s"] > 0 and rec["ratio_vs_bare"] > 0
        assert rec["best_batch_size"] in [p["batch_size"] for p in rec["sweep"]] and len(rec["sweep"]) == 2
        assert rec["items_per_s"] == max(p["items_per_s"] for p in rec["sweep"])
        assert rec["peak_gpu_mem_gib"] is None and rec["gpu_util_pct"] is None  # no GPU: no figures
        assert rec["target_ratio_vs_bare"] == 0.9 and rec["meets_targets"] is None  # judged on a GPU only
        assert rec["unit"] in ("images", "captions") and rec["seconds"] > 0
    by = {r["stage"]: r for r in doc["stages"]}
    assert by["recaption"]["tokens_per_s"] > 0 and by["recaption"]["new_tokens_per_item"] == 8
    assert all(p["batches"] for p in by["recaption"]["sweep"])
    assert by["clipscore"]["target_items_per_s"] == 1000 and by["clipscore"]["decode_only_items_per_s"] > 0


def test_full_size_models_have_the_real_shapes() -> None:
    import open_clip
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration, Owlv2ForObjectDetection

    from vila2_curate.pipelines.demo.detector import detector_config
    from vila2_curate.pipelines.demo.models import _train_tokenizer, clip_model_cfg, lm_config
    from vila2_curate.pipelines.demo.vlm import _train_tokenizer as vlm_tokenizer
    from vila2_curate.pipelines.demo.vlm import vlm_config

    def params(m: torch.nn.Module) -> float:
        return sum(p.numel() for p in m.parameters()) / 1e6

    with torch.device("meta"):  # shapes only: no weights allocated
        clip = open_clip.model.CLIP(**clip_model_cfg("vit-l-14"))
        tok = _train_tokenizer(0)
        small = AutoModelForCausalLM.from_config(lm_config("qwen2.5-0.5b", tok))
        large = AutoModelForCausalLM.from_config(lm_config("qwen2.5-1.5b", tok))
        vlm = LlavaForConditionalGeneration._from_config(vlm_config("llava-1.5-7b", vlm_tokenizer()))
        owl = Owlv2ForObjectDetection._from_config(detector_config("owlv2-base-16"))
    assert clip.visual.conv1.weight.shape == (1024, 3, 14, 14)
    assert params(clip) == pytest.approx(427.6, abs=0.1)
    assert small.config.vocab_size == large.config.vocab_size == 151936
    assert (small.config.hidden_size, large.config.hidden_size) == (896, 1536)
    assert params(small) == pytest.approx(494.0, abs=0.1) and params(large) == pytest.approx(1543.7, abs=0.1)
    text = vlm.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (4096, 32, 32064)
    assert vlm.config.vision_config.image_size == 336 and vlm.config.vision_feature_layer == -2
    assert params(vlm) == pytest.approx(7063.4, abs=0.1)  # llava-hf/llava-1.5-7b-hf
    assert owl.config.vision_config.image_size == 960 and owl.config.text_config.vocab_size == 49408
    assert params(owl) == pytest.approx(155.0, abs=0.1)


def test_wheels_list_and_install_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    boot = _bootstrap()
    pins = boot.read_pins()
    names = {p.dist for p in pins}
    assert {"pydantic", "pydantic_core", "ftfy", "open_clip_torch", "setuptools", "wheel"} <= names
    assert all(p.version.count(".") >= 1 for p in pins)
    assert boot.must_install(pins) == []  # this environment has everything: the check runs in place
    fake = [boot.Pin("no-such-dist", "1.0", "no_such_module_here"), boot.Pin("pytest", "999.0", "pytest"),
            boot.Pin("numpy", "0.1", "numpy"), boot.Pin("nvidia-ml-py", "1.0", "no_nvml_here", True)]
    assert [p.dist for p in boot.needed(fake)] == ["no-such-dist", "pytest", "nvidia-ml-py"]
    assert boot.must_install(fake) == ["no_such_module_here"]  # an optional one alone starts nothing
    monkeypatch.setattr(boot, "project_missing", lambda: True)
    assert boot.must_install(pins) == ["vila2_curate"]
    text = (GPU / "fetch_wheels.sh").read_text()
    assert "--python-version 3.12" in text and "64 * 1024 * 1024" in text and "wheels.txt" in text
