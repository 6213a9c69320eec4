"""Seeded text for the sample dataset: MMC4 document sentences and the details that make captions distinct.

Text draws use their own numpy stream (seeded ``[seed, 0x7E47]``), apart from the picture stream, so a change
to the text leaves every image byte alone. Sentences come from a combinatorial grammar (topic vocabulary x
shared slots), so two unrelated documents share almost no word trigrams, as distinct web pages do.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

DOC_TOPICS: dict[str, dict[str, tuple[str, ...]]] = {
    "baking": {
        "nouns": ("sourdough loaf", "rye starter", "pie crust", "focaccia", "brioche dough", "lemon tart",
                  "cinnamon roll", "baguette", "banana bread", "shortbread", "croissant", "bagel"),
        "verbs": ("knead/kneaded", "proof/proofed", "bake/baked", "fold/folded", "glaze/glazed",
                  "shape/shaped", "score/scored", "chill/chilled"),
        "adjs": ("golden", "crusty", "airy", "buttery", "dense", "flaky", "tangy", "sticky"),
    },
    "travel": {
        "nouns": ("harbour walk", "night train", "hostel", "ferry crossing", "old quarter", "cable car",
                  "street market", "mountain pass", "river cruise", "cathedral tower", "museum pass",
                  "coastal road"),
        "verbs": ("visit/visited", "explore/explored", "book/booked", "cross/crossed", "photograph/photographed",
                  "skip/skipped", "recommend/recommended", "revisit/revisited"),
        "adjs": ("crowded", "quiet", "charming", "pricey", "windy", "sunlit", "remote", "lively"),
    },
    "garden": {
        "nouns": ("tomato bed", "herb spiral", "compost heap", "rose hedge", "bean trellis", "potato patch",
                  "apple tree", "pond liner", "strawberry row", "greenhouse", "lavender border", "seed tray"),
        "verbs": ("prune/pruned", "water/watered", "mulch/mulched", "sow/sowed", "harvest/harvested",
                  "repot/repotted", "weed/weeded", "fertilise/fertilised"),
        "adjs": ("leafy", "shaded", "waterlogged", "sunny", "overgrown", "fragrant", "sheltered", "sandy"),
    },
    "design": {
        "nouns": ("poster grid", "logo sketch", "colour palette", "type specimen", "landing page",
                  "brand guide", "icon set", "book cover", "mood board", "wireframe", "letterhead", "zine layout"),
        "verbs": ("sketch/sketched", "refine/refined", "print/printed", "crop/cropped", "align/aligned",
                  "review/reviewed", "iterate/iterated", "export/exported"),
        "adjs": ("minimal", "bold", "playful", "cluttered", "elegant", "muted", "geometric", "retro"),
    },
    "cycling": {
        "nouns": ("gravel bike", "chain ring", "climb", "saddle bag", "tubeless tyre", "descent",
                  "rain jacket", "bike path", "brake pad", "group ride", "headwind", "gear cable"),
        "verbs": ("ride/rode", "climb/climbed", "service/serviced", "patch/patched", "tune/tuned",
                  "race/raced", "pack/packed", "replace/replaced"),
        "adjs": ("muddy", "steep", "smooth", "punishing", "scenic", "gusty", "fast", "rough"),
    },
    "photography": {
        "nouns": ("prime lens", "tripod", "light meter", "film roll", "long exposure", "portrait session",
                  "darkroom print", "golden hour", "street scene", "flash unit", "contact sheet", "viewfinder"),
        "verbs": ("shoot/shot", "develop/developed", "frame/framed", "meter/metered", "edit/edited",
                  "scan/scanned", "expose/exposed", "test/tested"),
        "adjs": ("grainy", "sharp", "overexposed", "moody", "contrasty", "soft", "vivid", "washed-out"),
    },
}
_NAMES = ("Amira", "Bruno", "Chen", "Dana", "Emeka", "Freya", "Goran", "Hana", "Ivo", "Jules", "Kofi", "Lena",
          "Mateo", "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Sami", "Tove", "Ugo", "Vera", "Wim", "Yusuf",
          "Zofia", "Ines", "Marek", "Aiko", "Tariq", "Elsa")
_PLACES = ("Porto", "Ghent", "Kraków", "Lyon", "Bergen", "Trieste", "Bilbao", "Tallinn", "Malmö", "Graz",
           "Cork", "Utrecht", "Brno", "Nantes", "Aarhus", "Split", "Bologna", "Leipzig", "Sintra", "Zadar",
           "Lucerne", "Ljubljana", "Turku", "Girona", "Innsbruck", "Plovdiv", "Galway", "Freiburg")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_UNITS = ("minutes", "hours", "days", "weeks")
_SHOPS = ("hardware store", "corner bakery", "flea market", "bookshop", "farm stall", "camera shop",
          "bike shop", "co-op")
_STREETS = ("Elm", "Harbour", "Mill", "Chapel", "Orchard", "Station", "Bridge", "Market", "Linden", "Quarry")
_ADVS = ("slightly", "far", "noticeably", "a little", "much", "somewhat")
_ADJ2 = ("worth it", "tricky", "surprisingly easy", "rewarding", "exhausting", "a bargain", "disappointing",
         "better than expected")
_SEASONS = ("spring", "summer", "autumn", "winter")
_TRANSPORT = ("bus", "train", "bike", "car", "ferry", "tram")
_ORDINALS = ("first", "second", "third", "fourth", "fifth")
_SENTENCES = (
    "{name} {ved} the {adj} {noun} in {place} last {month}.",
    "Last {month} {name} and {name2} {ved} {num} times near {place}.",
    "It took {num} {unit} to {v} the {noun}, which {name} found {adj2}.",
    "{place} is {num} km from {place2}, so {name} went by {transport}.",
    "Our {noun} cost {num} euros at the {shop} on {street} Street.",
    "If you {v} a {noun} in {month}, keep it {adj} for {num} {unit}.",
    "{name} says the {noun} at {place} is {adv} more {adj} than last {season}.",
    "We {ved} {noun2} until it looked {adj}, about {num} {unit} in total.",
    "According to {name}, a {adj} {noun} from {place} is {adj2} in {season}.",
    "The {ordinal} time we {ved} there, the {noun} was {adj} and the {noun2} {adj3}.",
    "Tip {num}: never {v} a {adj} {noun} without asking {name} about the {noun2}.",
    "In {year} {name} {ved} a {noun} for {num} friends from {place}.",
    "The {noun2} at {street} Street stays {adj} until {month}, {name} told us.",
    "Bring a {adj} {noun} if you plan to {v} anything around {place} in {season}.",
    "{name} prefers to {v} the {noun} by hand, which takes {num} {unit} longer.",
    "By {month} {year} the {noun} near {place} had become {adj} again.",
    "{num} readers asked {name} how to {v} a {noun}; the short answer is {adj2}.",
    "On a {adj} {season} morning in {place}, {name2} {ved} the {noun2} twice.",
    "The {shop} in {place} sold out of {noun} kits after {num} {unit}.",
    "Ask {name} whether the {adj3} {noun2} from {place2} was {adj2} in the end.",
)
_PHOTO_DETAILS = (
    ", {place}, {month} {year}", " near {place}", " - photo by {name}, {place2}",
    " seen from {street} Street in {place}", " on a trip to {place} in {season}", " ({place}, {year})",
)
_OTHER_DETAILS = (
    " - uploaded by {name}, {month} {year}", " ({place} collection, {year})", " #{num} in {name}'s set",
    ", item {num} from the {place} archive", " for the {place2} {season} fair",
)


class ProseGenerator:
    """Seeded sentence and caption-detail generator, separate from the image stream so text changes leave
    image bytes alone."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng([seed, 0x7E47])

    def pick(self, seq: Any) -> Any:
        return seq[int(self.rng.integers(0, len(seq)))]

    def _slots(self, topic: str) -> dict[str, str]:
        voc = DOC_TOPICS[topic]
        verb = self.pick(voc["verbs"]).split("/")
        name, name2 = (str(x) for x in self.rng.choice(_NAMES, size=2, replace=False))
        place, place2 = (str(x) for x in self.rng.choice(_PLACES, size=2, replace=False))
        noun, noun2 = (str(x) for x in self.rng.choice(voc["nouns"], size=2, replace=False))
        adj, adj3 = (str(x) for x in self.rng.choice(voc["adjs"], size=2, replace=False))
        return {"name": name, "name2": name2, "place": place, "place2": place2, "noun": noun, "noun2": noun2,
                "adj": adj, "adj3": adj3, "v": verb[0], "ved": verb[1], "adj2": self.pick(_ADJ2),
                "month": self.pick(_MONTHS), "year": str(int(self.rng.integers(1995, 2024))),
                "num": str(int(self.rng.integers(2, 98))), "unit": self.pick(_UNITS), "shop": self.pick(_SHOPS),
                "street": self.pick(_STREETS), "adv": self.pick(_ADVS), "season": self.pick(_SEASONS),
                "transport": self.pick(_TRANSPORT), "ordinal": self.pick(_ORDINALS)}

    def document(self, topic: str, n_sentences: int) -> list[str]:
        """``n_sentences`` (<= len(_SENTENCES)) sentences on ``topic``, each template at most once: a page
        does not repeat its own phrasing, and shared template words stay a small share of any two pages."""
        out = []
        for t in self.rng.choice(len(_SENTENCES), size=n_sentences, replace=False):
            s = _SENTENCES[int(t)].format(**self._slots(topic))
            out.append(s[0].upper() + s[1:])
        return out

    def edit_number(self, sentence: str) -> str:
        """The sentence with its first number changed: the small edit a re-crawled page typically shows."""
        m = re.search(r"\d+", sentence)
        if m is None:
            return sentence.rstrip(".") + " again."
        old = int(m.group())
        new = old + int(self.rng.integers(1, 9))
        return sentence[:m.start()] + str(new) + sentence[m.end():]

    def caption_detail(self, photo: bool) -> str:
        """A place, date or author phrase (photo or other kind) that makes a repeated caption distinct."""
        return self.pick(_PHOTO_DETAILS if photo else _OTHER_DETAILS).format(**self._slots("travel"))


def word_shingles(text: str, k: int = 3) -> set[tuple[str, ...]]:
    """Lower-cased word k-shingles, as curation.dedup.minhash builds them (a short text is one shingle)."""
    w = text.lower().split()
    return {tuple(w[i:i + k]) for i in range(max(1, len(w) - k + 1))} if w else set()


def jaccard(a: set[Any], b: set[Any]) -> float:
    """|a & b| / |a | b|; two empty sets count as identical."""
    return len(a & b) / len(a | b) if a or b else 1.0

