"""Runs of the sample that tests share: configs pointed at a sample folder, a tiny valid output, and what
a run publishes."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_config(sample: Path, out: Path, dest: Path, *, stages: list | None = None,
                 sources: list[str] | None = None, **output) -> Path:
    """configs/quickstart.yaml re-pointed at ``sample`` and ``out`` (optionally other stages, only the named
    ``sources``, other output keys)."""
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    for src in raw["sources"]:
        src["paths"] = [p.replace("../sample", str(sample)) for p in src["paths"]]
        for k in ("image_root", "image_dir"):
            if k in src:
                src[k] = src[k].replace("../sample", str(sample))
    raw["output"]["path"] = str(out)
    raw["output"].update(output)
    if stages is not None:
        raw["stages"] = stages
    if sources is not None:
        raw["sources"] = [s for s in raw["sources"] if s["name"] in sources]
    for stage in raw["stages"]:
        for k, v in list(stage.items()):
            if isinstance(v, str) and v.startswith("../sample"):
                stage[k] = v.replace("../sample", str(sample))
    dest.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def write_round_config(sample: Path, root: Path, dest: Path, *, name: str, seed: int = 0,
                       after: list | None = None) -> Path:
    """A recaption round over ``root/r{prev_round}`` -> ``root/r{round}`` with the demo VLM, then ``after``."""
    import yaml

    stages: list[dict] = [{
        "type": "recaption", "prompts": "self_augment",
        "captioner": {"model": str(sample / "models" / "vlm"), "model_tag": "demo-vlm",
                      "generation": {"max_new_tokens": 12, "seed": seed}, "runtime": {"batch_size": 8}},
    }, *(after or [])]
    raw = {"name": f"{name}-r{{round}}", "batch_size": 16,
           "sources": [{"name": "prev", "kind": "vila_wds", "paths": [str(root / "r{prev_round}")]}],
           "stages": stages, "output": {"path": str(root / "r{round}"), "shard_max_samples": 64}}
    dest.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def tiny_valid_output(tmp: Path, out: Path) -> None:
    """A 2-row COYO run: the smallest output that passes `vila2-curate validate`."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from vila2_curate.pipelines.executors.local import run_local
    from vila2_curate.schemas.config import load_config

    def jpeg(shade: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (320, 240), (shade, 90, 200 - shade)).save(buf, format="JPEG")
        return buf.getvalue()

    (tmp / "coyo").mkdir()
    pq.write_table(pa.table({"id": [1, 2], "url": ["http://a/1.jpg", "http://a/2.jpg"],
                             "text": ["a cat", "a dog"], "image": [jpeg(10), jpeg(150)]}),
                   tmp / "coyo" / "part-0.parquet")
    cfg = tmp / "run.yaml"
    cfg.write_text(f"sources: [{{name: c, kind: coyo_parquet, paths: ['{tmp}/coyo/*.parquet'], "
                   f"image_column: image}}]\noutput: {{path: '{out}'}}\n")
    assert run_local(load_config(cfg), progress=False)["balanced"]


def output_files(root: Path) -> dict[str, bytes]:
    """The files a run publishes whose bytes must not depend on engine, interruption or batch size."""
    keep = (".tar", ".pkl", ".count")
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
             if p.is_file() and (p.suffix in keep or p.name in ("stats.json", "wids-meta.json"))
             and "_work" not in p.parts}
    return files


def assert_same_stage_timings(out: Path, ref: Path) -> None:
    """timings.json names the same steps, with the same row counts, whatever engine ran them."""
    import json

    mine, theirs = (json.loads((p / "timings.json").read_text())["stages"] for p in (out, ref))
    assert sorted(mine) == sorted(theirs)
    assert {k: v["rows"] for k, v in mine.items()} == {k: v["rows"] for k, v in theirs.items()}
    assert all(v["seconds"] > 0 for v in mine.values()), mine
