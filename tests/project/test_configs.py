"""Every shipped config parses (the real-model ones too: they are documentation users copy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.runs import ROOT
from vila2_curate.schemas.config import ConfigError, load_config, parse_config


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_parses(path: Path):
    text = path.read_text()
    cfg = load_config(path, round=1 if "{round}" in text else None)
    assert cfg.sources and cfg.stages and cfg.output.path


def test_unknown_keys_name_the_field():
    with pytest.raises(ConfigError, match=r"stages\.0\.dedup\.methodz"):
        parse_config({"sources": [{"name": "a", "kind": "mmc4", "paths": ["x"]}], "output": {"path": "o"},
                      "stages": [{"type": "dedup", "methodz": []}]})
    with pytest.raises(ConfigError, match=r"stages\.0\.recaption\.captioner\.modle"):
        parse_config({"sources": [{"name": "a", "kind": "vila_wds", "paths": ["x"]}], "output": {"path": "o"},
                      "stages": [{"type": "recaption", "captioner": {"modle": "m"}}]})


def test_config_hash_ignores_engine_and_batch_size():
    base = {"sources": [{"name": "a", "kind": "mmc4", "paths": ["x"]}], "output": {"path": "o"}}
    a = parse_config({**base, "engine": "local", "batch_size": 8})
    b = parse_config({**base, "engine": "ray", "batch_size": 512})
    c = parse_config({**base, "stages": [{"type": "normalize", "min_side": 100}]})
    assert a.config_hash() == b.config_hash() != c.config_hash()
