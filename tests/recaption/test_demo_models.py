"""The demo model builder: deterministic, marked as demo, loadable through the production loaders."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from vila2_curate.curation.models import (
    identity_tag,
    load_causal_lm,
    load_open_clip,
    resolve_device,
    resolve_dtype,
)
from vila2_curate.pipelines.demo.models import DEMO_MARKER, build_demo_models
from vila2_curate.schemas.config import ModelRuntime


def _digests(paths: dict[str, str]) -> dict[str, str]:
    return {
        name: hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(folder).iterdir()))).hexdigest()
        for name, folder in paths.items()
    }


def test_build_is_deterministic_fast_and_marked(tmp_path: Path) -> None:
    import open_clip  # noqa: F401 - import time is not build time
    import transformers  # noqa: F401

    t = time.perf_counter()
    a = build_demo_models(tmp_path / "a", seed=0)
    assert time.perf_counter() - t < 30
    b = build_demo_models(tmp_path / "b", seed=0)
    assert set(a) == {"clip", "lm_small", "lm_large"}
    assert _digests(a) == _digests(b)
    assert _digests(a)["clip"] != _digests(build_demo_models(tmp_path / "c", seed=1))["clip"]
    for folder in a.values():
        assert (Path(folder) / DEMO_MARKER).is_file()
    assert (Path(a["clip"]) / "open_clip_config.json").is_file()


def test_loaders_read_demo_models(tmp_path: Path) -> None:
    paths = build_demo_models(tmp_path, seed=0)
    clip = load_open_clip(paths["clip"], None, "cpu")
    assert clip.identity["demo"] is True and identity_tag(clip.identity).endswith("|demo")
    assert clip.tokenizer(["a dog"]).shape == (1, 77)
    lm = load_causal_lm(paths["lm_small"], "cpu")
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token_id is not None
    assert lm.identity["demo"] is True and not lm.model.training


def test_device_and_dtype_policy() -> None:
    cpu = resolve_device(ModelRuntime(device="cpu", precision="bf16"))
    assert cpu.type == "cpu" and resolve_dtype(ModelRuntime(precision="bf16"), cpu) == torch.float32
    assert resolve_dtype(ModelRuntime(precision="fp16"), torch.device("cuda")) == torch.float16
    auto = resolve_device(ModelRuntime())
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
