"""Items of the sample dataset: one picture (or its absence) with all its ground truth, and their factories.

``ItemFactory`` makes the ordinary pictures (shapes, sign text, photos), the planted exact, near and
look-alike groups and the filter edge cases (EXIF-rotated, too small, elongated); broken payloads are in
hostile.py. Every factory draws from one PictureGenerator, so the order of calls fixes every byte.
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw, ImageEnhance

from vila2_curate.pipelines.demo.pictures import COLORS, PictureGenerator, encode_jpeg, encode_png, phash_hex

BOILERPLATE_CAPTION = "Stock photo - image may contain: outdoor"


class SampleItem:
    """One image (or its absence) with everything the ground truth says about it."""

    def __init__(self, kind: str, data: bytes | None, caption: str, *, expected: str = "keep",
                 fmt: str = "jpg", width: int | None = None, height: int | None = None,
                 shapes: list[dict[str, Any]] | None = None, words: list[dict[str, Any]] | None = None,
                 boilerplate: bool = False, notes: str = "", phash_img: Image.Image | None = None) -> None:
        self.kind, self.data, self.caption, self.expected, self.fmt = kind, data, caption, expected, fmt
        self.width, self.height, self.shapes, self.words = width, height, shapes, words
        self.boilerplate, self.notes = boilerplate, notes
        self.exact_group: str | None = None
        self.near_group: str | None = None
        self.near_transform: str | None = None
        self.similar_group: str | None = None
        self.phash = phash_hex(phash_img) if phash_img is not None else None
        self.caption_bytes: bytes | None = None  # set when the stored caption is not UTF-8
        self.caption_final = False  # set once GroundTruthLedger.settle_caption has made it distinct
        self.hostile: str | None = None  # a HOSTILE_KINDS entry: the stored caption is made hostile
        self.caption_intended: str | None = None

    def copy(self) -> SampleItem:
        new = SampleItem.__new__(SampleItem)
        new.__dict__.update(self.__dict__)
        return new


class ItemFactory:
    """Makes items from one PictureGenerator: ordinary pictures, planted duplicate groups and edge cases."""

    def __init__(self, g: PictureGenerator) -> None:
        self.g = g

    def shape_item(self) -> SampleItem:
        img, shapes, cap = self.g.shapes()
        return SampleItem("shape", encode_jpeg(img, 92), cap, width=img.width, height=img.height,
                          shapes=shapes, phash_img=img)

    def text_item(self) -> SampleItem:
        img, words, cap = self.g.text()
        return SampleItem("text", encode_png(img), cap, fmt="png", width=img.width, height=img.height,
                          words=words, phash_img=img)

    def photo_item(self, boilerplate: bool = False) -> SampleItem:
        img, cap = self.g.photo()
        return SampleItem("photo", encode_jpeg(img, 90), BOILERPLATE_CAPTION if boilerplate else cap,
                          width=img.width, height=img.height, boilerplate=boilerplate, phash_img=img)

    def plain_items(self, n: int) -> list[SampleItem]:
        out: list[SampleItem] = []
        for i in range(n):
            r = i % 3
            out.append(self.shape_item() if r == 0 else self.text_item() if r == 1 else self.photo_item())
        return out

    def exact_group(self, gid: str, n: int) -> list[SampleItem]:
        base = self.photo_item() if gid.endswith("1") else self.shape_item()
        base.exact_group = gid
        return [base.copy() for _ in range(n)]

    def near_group(self, gid: str) -> list[SampleItem]:
        """Same picture: original, re-encoded q=60, resized 0.9x, cropped 3% (1.5% a side), brightness +5%."""
        img, cap = self.g.photo(self.g.randint(420, 560), self.g.randint(330, 420))
        w, h = img.size
        dx, dy = int(w * 0.015), int(h * 0.015)
        variants = [
            ("original_q90", img, 90),
            ("reencode_q60", img, 60),
            ("resize_0.9x", img.resize((int(w * 0.9), int(h * 0.9)), Image.Resampling.LANCZOS), 90),
            ("crop_3pct", img.crop((dx, dy, w - dx, h - dy)), 90),
            ("brightness_+5pct", ImageEnhance.Brightness(img).enhance(1.05), 90),
        ]
        items = []
        for name, im, q in variants:
            it = SampleItem("photo", encode_jpeg(im, q), cap, width=im.width, height=im.height,
                            phash_img=im, notes=f"near-duplicate variant {name}")
            it.near_group, it.near_transform = gid, name
            items.append(it)
        return items

    def similar_pair(self, gid: str, variant: str) -> list[SampleItem]:
        """Distinct pictures whose pHash collides (flat images): dedup must NOT merge them."""
        w, h = 400, 300
        items = []
        if variant == "flat":
            for color in ("red", "blue"):
                img = Image.new("RGB", (w, h), COLORS[color])
                it = SampleItem("flat", encode_jpeg(img, 92), f"Plain {color} background, solid colour",
                                width=w, height=h, phash_img=img, notes="flat colour; pHash is uninformative")
                it.similar_group = gid
                items.append(it)
        else:
            for label in ("ellipse", "rectangle"):
                img = Image.new("RGB", (w, h), (255, 255, 255))
                box = [140, 90, 260, 210]
                PictureGenerator.draw_shape(ImageDraw.Draw(img), label, box, COLORS["black"])
                it = SampleItem("shape", encode_jpeg(img, 92), f"Black {label} icon on white", width=w,
                                height=h, shapes=[PictureGenerator.shape_record(label, "black", box, w, h)],
                                phash_img=img, notes="simple shape on white; different shape from its pair")
                it.similar_group = gid
                items.append(it)
        return items

    def exif6_item(self) -> SampleItem:
        """Displayed upright WxH with known shapes; stored rotated 90 CCW with EXIF Orientation=6."""
        img, shapes, cap = self.g.shapes(520, 340, n=2, bg="plain")
        stored = img.transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        return SampleItem("exif_rotated", encode_jpeg(stored, 92, exif=exif.tobytes()), cap,
                          width=img.width, height=img.height, shapes=shapes, phash_img=img,
                          notes=f"stored {stored.width}x{stored.height} with EXIF Orientation=6; "
                                "width/height/boxes are after exif_transpose")

    def too_small_item(self) -> SampleItem:
        img, shapes, cap = self.g.shapes(self.g.randint(120, 180), self.g.randint(100, 190), n=1, bg="plain")
        return SampleItem("too_small", encode_jpeg(img, 90), cap, expected="too_small", width=img.width,
                          height=img.height, shapes=shapes, phash_img=img)

    def aspect_item(self) -> SampleItem:
        img, cap = self.g.photo(self.g.randint(900, 1000), self.g.randint(210, 250))
        return SampleItem("elongated", encode_jpeg(img, 90), "Panoramic banner " + cap.lower(),
                          expected="aspect", width=img.width, height=img.height, phash_img=img,
                          notes="aspect ratio > 3")

