"""The one-module-per-idea helpers: caption selection, image decoding reasons, demo identity, imageless documents.

Each stage imports these, so what they return is what every stage writes; the stage tests cover the wiring.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from vila2_curate.schemas.captions import (
    CLIPSCORE_CAPTION,
    SPECIALISTS_CAPTION,
    TEXT_DELTALOSS_CAPTION,
    VLM_DELTALOSS_CAPTION,
    latest_usable_caption,
    newest_caption_text,
)
from vila2_curate.schemas.demo_model import DEMO_MARKER, is_demo_model, mark_demo_model
from vila2_curate.schemas.documents import has_kept_image
from vila2_curate.schemas.images import EMPTY_IMAGE_BYTES, UndecodableImage, decode_rgb

CAPTIONS = [
    {"round": 1, "text": "a red car parked on a street", "flags": []},
    {"round": 2, "text": "a red car parked on a", "flags": ["truncated"]},
]


def test_each_stage_judges_its_named_caption() -> None:
    # The newest caption as written (flags not consulted) vs the newest usable one the trainer reads.
    assert newest_caption_text(CAPTIONS, "alt") == "a red car parked on a"
    assert latest_usable_caption(CAPTIONS) is CAPTIONS[0]
    assert CLIPSCORE_CAPTION(CAPTIONS, "alt") == TEXT_DELTALOSS_CAPTION(CAPTIONS, "alt") == "a red car parked on a"
    assert VLM_DELTALOSS_CAPTION(CAPTIONS, "alt") == SPECIALISTS_CAPTION(CAPTIONS, "alt") == CAPTIONS[0]["text"]
    assert CLIPSCORE_CAPTION(None, "alt") == VLM_DELTALOSS_CAPTION(None, "alt") == "alt"
    assert VLM_DELTALOSS_CAPTION([CAPTIONS[1]], "") is None


def test_undecodable_reasons_are_stable_and_address_free() -> None:
    with pytest.raises(UndecodableImage) as empty:
        decode_rgb(b"")
    assert str(empty.value) == EMPTY_IMAGE_BYTES
    reasons = set()
    for _ in range(2):
        with pytest.raises(UndecodableImage) as bad:
            decode_rgb(b"not an image at all" * 4)
        reasons.add(str(bad.value))
    (reason,) = reasons  # the same bytes give the same reason (no object address in it)
    assert reason.startswith("image_undecodable: UnidentifiedImageError: ") and "0x" not in reason
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 10, 10)).save(buf, format="JPEG")
    img = decode_rgb(buf.getvalue(), draft_to=(100, 100))
    assert img.mode == "RGB" and 100 <= img.width < 640  # draft-decoded, never below the requested size


def test_demo_marker_round_trip(tmp_path: Path) -> None:
    assert not is_demo_model(tmp_path) and not is_demo_model(None)
    mark_demo_model(tmp_path, "random weights")
    assert is_demo_model(tmp_path) and (tmp_path / DEMO_MARKER).read_text() == "random weights\n"


def test_document_kept_image() -> None:
    assert not has_kept_image(None) and not has_kept_image([])
    assert not has_kept_image([{"drop_reason": "too_small"}, None])
    assert has_kept_image([{"drop_reason": "too_small"}, {"drop_reason": None}])
