"""Pydantic config models, loaded from YAML. Unknown keys are errors that name the field."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vila2_curate.schemas.registry import config_classes, on_register, register_stage


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FetchConfig(_Strict):
    """How a source with ``fetch_remote: true`` downloads http(s) image URLs (img2dataset's defaults
    where it has one: 10 s timeout, X-Robots-Tag opt-out directives; retries and a byte cap on top)."""

    threads: int = Field(default=16, ge=1, le=512)  # requests in flight per reader
    prefetch_rows: int = Field(default=4096, ge=1)  # rows in flight ahead of the one being emitted
    prefetch_bytes: int = Field(default=256 * 1024 * 1024, ge=1)  # downloaded bytes waiting behind a slow row
    timeout_s: float = Field(default=10.0, gt=0)  # per attempt, whole response (connect + body)
    retries: int = Field(default=2, ge=0, le=10)  # extra attempts on 429 / 5xx / connect and read errors
    backoff_s: float = Field(default=0.5, ge=0)  # first retry waits this long, then doubles
    max_backoff_s: float = Field(default=8.0, ge=0)  # also caps a server's Retry-After
    max_bytes: int = Field(default=16 * 1024 * 1024, ge=1)  # larger bodies are aborted: image_too_large
    max_redirects: int = Field(default=5, ge=0)
    user_agent_token: str = "vila2-curate"  # the X-Robots-Tag user-agent token we answer to
    user_agent: str = "vila2-curate/0.1 (open data-curation pipeline; image-text dataset research)"
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])


# how fast, not what: a rerun with more threads still resumes the same output
_FETCH_SPEED_KNOBS = {"threads", "prefetch_rows", "prefetch_bytes"}


class SourceConfig(_Strict):
    """One input dataset. ``paths`` are fsspec URLs or globs (local, memory://, s3://, gs://)."""

    name: str
    kind: Literal["img2dataset", "coyo_parquet", "mmc4", "vila_wds"]  # vila_wds: our own output (rounds)
    paths: list[str]
    storage_options: dict[str, Any] = Field(default_factory=dict)
    # coyo_parquet: where the image comes from (a bytes column, or a path/url column read through fsspec)
    image_column: str | None = None
    image_path_column: str | None = None
    image_root: str | None = None  # prefix for relative paths in image_path_column
    key_column: str = "id"
    text_column: str = "text"
    url_column: str = "url"
    # mmc4: image folder (default: the jsonl's own folder)
    image_dir: str | None = None
    # image references in the data resolve only inside image_root / image_dir; a URL reference is fetched
    # only when the source opts in, only for these schemes, and never from loopback/private/link-local
    # addresses unless allow_private_networks (pipelines/io/readers/refs.py, fetch.py)
    fetch_remote: bool = False
    fetch_schemes: list[Literal["http", "https"]] = Field(default_factory=lambda: ["http", "https"])
    allow_private_networks: bool = False
    fetch: FetchConfig = FetchConfig()

    @field_validator("name")
    @classmethod
    def _name_is_path_safe(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\. ") or len(v) > 40:
            raise ValueError("source name must be 1-40 chars without '/', '\\\\', '.' or spaces")
        return v


class NormalizeConfig(_Strict):
    """Decode probe, EXIF orientation, sha256, pHash, size/aspect filters (img2dataset COYO defaults)."""

    type: Literal["normalize"] = "normalize"
    min_side: int = 200
    max_aspect: float = 3.0
    max_pixels: int = 89_478_485  # PIL's own decompression-bomb limit (~0.25 GiB of 24-bit RGB)
    draft: bool = True  # JPEG draft decoding for the probe and pHash (2-8x faster)
    apply_exif_orientation: bool = True
    reencode_quality: int = 95


class CaptionHygieneConfig(_Strict):
    """Caption hygiene before dedup (schemas/text_hygiene.py): mojibake repaired (ftfy), control, zero-width,
    bidi and BOM characters removed, special tokens removed, whitespace normalised, long captions cut at a
    sentence end. The same rules clean recaption and specialist text."""

    type: Literal["caption_hygiene"] = "caption_hygiene"
    max_chars: int | None = Field(default=2000, ge=16)  # None: no cut
    fix_mojibake: bool = True  # ftfy repair of mis-decoded text and HTML entities
    # removed besides <image>, <video> and every <|...|>: tokenizer specials a caption must not carry
    special_tokens: list[str] = Field(default_factory=lambda: [
        "<s>", "</s>", "<unk>", "<pad>", "<im_start>", "<im_end>", "<im_patch>", "<vila/sentinel>",
        "<vila/video>", "[INST]", "[/INST]"])
    # a pair whose caption is empty (after cleaning) is dropped (empty_caption / empty_caption_after_hygiene)
    # unless this is true AND a recaption stage follows in the same run (it writes the caption the writer uses)
    keep_empty_if_recaptioned: bool = True


class DedupConfig(_Strict):
    """Duplicate removal across all sources; groups from every method are joined with union-find.

    Put a dedup stage with exact/phash *before* clipscore (cheap, saves GPU time) and one with semantic
    *after* it (needs embeddings). Keeper of a group (curation/dedup/keeper.py): a member the writer
    will publish, then the most pixels, then the highest CLIP score, then the smallest id.
    """

    type: Literal["dedup"] = "dedup"
    methods: list[Literal["exact", "phash", "minhash_documents", "minhash_captions", "semantic"]] = Field(
        default_factory=lambda: ["exact", "phash"])
    phash_max_distance: int = 4  # Hamming distance k on 64-bit pHash
    phash_confirm: Literal["thumbnail", "clip", "none"] = "thumbnail"  # second signal for pHash candidates
    thumbnail_max_distance: float = 0.08  # mean |a-b| of 16x16 grey thumbnails, in [0, 1]
    # thumbnail confirmation, the colour-aware part (curation/dedup/thumb_match.py; tuned on pipelines/demo/dedup_eval.py)
    thumbnail_max_local_distance: float = 0.4  # largest grey cell difference (3x3-neighbourhood tolerant), [0, 1]
    colour_max_local_delta_e: float = 22.0  # largest Lab cell difference (CIE76 delta E, 3x3-tolerant)
    colour_max_mean_delta_e: float = 7.0  # delta E of the mean colours, and of the backgrounds cropped away
    thumbnail_max_shift: float = 0.12  # content-box move, as a fraction of the side (a 5% crop moves it ~0.05)
    thumbnail_max_detail: float = 0.095  # 98th-percentile 32x32 grey cell difference of content-aligned pictures
    thumbnail_neighbours: int = 10  # also pair each image with its k nearest thumbnails (crops); 0: off
    clip_confirm_min_cosine: float = 0.9
    minhash_num_perm: int = 128
    minhash_threshold: float = 0.8  # Jaccard over word shingles
    shingle_words: int = 3
    boilerplate_min_images: int = 5  # a caption near-duplicated on >= this many distinct images is flagged
    semantic_eps: float = 0.05  # cosine >= 1 - eps forms a group (SemDeDup)
    semantic_clusters: int | None = None  # k-means clusters; None: about sqrt(n / 4)
    mmc4_policy: Literal["drop_image", "drop_document"] = "drop_image"
    seed: int = 0
    # a duplicate group this large is reported in summaries.json (it usually means a constant hash, a
    # placeholder image or a boilerplate caption); it is still decided like any group
    large_component: int = 100_000


class ModelRuntime(_Strict):
    """Where and how a model stage runs; ``gpus`` is the per-worker share read by the Ray engine."""

    device: str = "auto"  # "auto" -> cuda if available else cpu
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # fp16/bf16 apply on GPU only
    batch_size: int = 32
    gpus: float = 0.0
    cpus: float = 1.0
    memory_gb: float = 0.0  # memory one worker reserves on Ray (0: no reservation)
    workers: int = 1  # actor-pool size on Ray


class ClipScoreConfig(_Strict):
    """open_clip image/text embeddings -> CLIP-S = 2.5 * max(cos, 0) (Hessel et al. 2021)."""

    type: Literal["clipscore"] = "clipscore"
    model: str = "ViT-B-32"  # open_clip model name, or a local dir holding open_clip_config.json
    pretrained: str | None = None  # pretrained tag (cached) or a local checkpoint path
    runtime: ModelRuntime = ModelRuntime()
    draft: bool = True  # JPEG draft decoding to about the model's input size


class ClipFilterConfig(_Strict):
    """Keep rows by CLIP score: a fixed floor and/or the top p% per source over the whole dataset."""

    type: Literal["clip_filter"] = "clip_filter"
    min_score: float | None = None  # floor on CLIP-S
    top_percent: float | None = None  # keep the best p% per source (or per shard with the vila preset)
    method: Literal["exact", "sketch"] = "exact"
    preset: Literal["vila_coyo"] | None = None  # VILA's COYO rule on the dataset's own clip_similarity_*
    vila_min_similarity_sum: float = 0.6  # preset: floor on clip_similarity_vitb32 + clip_similarity_vitl14


class DeltaLossConfig(_Strict):
    """NVILA DeltaLoss: keep the top K by mean log p_large(text) - mean log p_small(text) per subset."""

    type: Literal["deltaloss"] = "deltaloss"
    small_model: str  # transformers causal LM: local path or hub name
    large_model: str
    scorer: Literal["lm", "vlm"] = "lm"  # vlm: log-likelihood of the caption given the image
    keep_fraction: float = 0.5
    subset_by: str = "source"  # a row column, or "meta.<field>"
    method: Literal["exact", "sketch"] = "exact"  # partitioned decide: exact per-subset sort, or a KLL sketch
    max_length: int = 256
    trust_remote_code: bool = False
    runtime: ModelRuntime = ModelRuntime()


class GenerationParams(_Strict):
    """Generation settings; their hash (with the seed) is each caption's ``params_hash``."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0


class CaptionerConfig(_Strict):
    """A VLM that writes text about an image: in-process transformers, or an OpenAI-compatible server."""

    backend: Literal["transformers", "openai"] = "transformers"
    model: str  # transformers: local path or hub id; openai: the served model name
    model_tag: str | None = None  # lineage tag and sidecar folder name; default: last part of ``model``
    processor: str | None = None  # transformers: processor path if not beside the model
    trust_remote_code: bool = False  # only when the model's config says it needs it (NVILA-*-hf)
    base_url: str | None = None  # openai: e.g. http://sglang-host:30000/v1
    api_key_env: str = "OPENAI_API_KEY"  # openai: read the key from this env var (may be unset)
    max_concurrency: int = 16  # openai: requests in flight per worker
    timeout_s: float = 120.0
    max_retries: int = 4
    image_max_side: int = 1024  # downscale larger images before sending / preprocessing
    generation: GenerationParams = GenerationParams()
    runtime: ModelRuntime = ModelRuntime()


class RecaptionConfig(_Strict):
    """VILA² self-augment: round k writes a new caption for every kept pair row with lineage."""

    type: Literal["recaption"] = "recaption"
    round: int = 1  # overridden by `--round K`
    captioner: CaptionerConfig
    prompts: str = "self_augment"  # a built-in prompt set, or a path to a prompt-set YAML
    sidecars: bool = True  # write <captions>/<model-tag>/<tar relpath>.json next to the shards


class OcrConfig(_Strict):
    """rapidocr-onnxruntime text lines with boxes, plus an optional VLM OCR prompt."""

    type: Literal["ocr"] = "ocr"
    min_score: float = 0.5
    vlm: CaptionerConfig | None = None
    runtime: ModelRuntime = ModelRuntime()


class GroundingConfig(_Strict):
    """Zero-shot detection (OWLv2 / Grounding DINO through transformers' Auto API) of caption phrases."""

    type: Literal["grounding"] = "grounding"
    model: str
    box_threshold: float = 0.25
    max_phrases: int = 8
    trust_remote_code: bool = False
    runtime: ModelRuntime = ModelRuntime()


class SpatialConfig(_Strict):
    """Spatial relations derived from the grounded boxes, plus an optional VLM spatial prompt."""

    type: Literal["spatial"] = "spatial"
    max_relations: int = 12
    vlm: CaptionerConfig | None = None


# The stage registry (schemas/registry.py): config type -> the stage class(es) it runs, one line per stage.
register_stage(NormalizeConfig, "vila2_curate.curation.normalize:NormalizeStage")
register_stage(CaptionHygieneConfig, "vila2_curate.curation.text_hygiene:CaptionHygieneStage")
register_stage(DedupConfig, "vila2_curate.curation.dedup.stage:DedupStage")
register_stage(ClipScoreConfig, "vila2_curate.curation.clipscore:ClipScoreStage")
register_stage(ClipFilterConfig, "vila2_curate.curation.clip_filter:ClipFilterStage")
register_stage(DeltaLossConfig, "vila2_curate.recaption.deltaloss_vlm:deltaloss_stages")  # lm or vlm scorer + top-k decision
register_stage(RecaptionConfig, "vila2_curate.recaption.stage:RecaptionStage")
register_stage(OcrConfig, "vila2_curate.specialists.ocr:OcrStage")
register_stage(GroundingConfig, "vila2_curate.specialists.grounding:GroundingStage")
register_stage(SpatialConfig, "vila2_curate.specialists.spatial:SpatialStage")


def _stage_config_union() -> Any:
    """``RunConfig.stages``' item type: the registered config classes, told apart by ``type:``."""
    return Annotated[Union[config_classes()], Field(discriminator="type")]  # noqa: UP007 - built at run time


StageConfig = _stage_config_union()


class CaptionPolicy(_Strict):
    """Which caption becomes the trainer's ``.txt``."""

    mode: Literal["latest", "original", "mix"] = "latest"
    mix_ratio: float = 0.5  # mix: share of samples that get the latest recaption
    seed: int = 0


class OutputConfig(_Strict):
    path: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    shard_max_samples: int | None = 10_000
    shard_max_bytes: int | None = None  # either or both; a shard closes at whichever comes first
    mmc4_docs_per_pkl: int = Field(1_000, ge=1)  # most documents in one pkl
    # MMC4 is written as a multiple of this many pkl/count pairs per input shard (documents dealt round-robin):
    # VILA gives each rank n_files // world_size files, so use a multiple of the GPUs per training job
    mmc4_min_files: int = Field(8, ge=1)
    mmc4_max_images_per_doc: int = 6  # VILA's interleaved loader
    caption_policy: CaptionPolicy = CaptionPolicy()
    keep_quarantine_payloads: bool = True  # write quarantined rows' bytes to quarantine/ for inspection


class BeamOptions(_Strict):
    """Beam runner and pipeline options; any runner (Dataflow, Flink, Spark) through ``pipeline_args``."""

    runner: str = "FnApiRunner"  # in-process; DirectRunner first tries to download a binary
    pipeline_args: list[str] = Field(default_factory=list)  # e.g. ["--project=p", "--region=r", ...]


class RayOptions(_Strict):
    address: str | None = None  # None: RAY_ADDRESS, else start a local cluster
    # a plan the cluster cannot place (pipelines/executors/ray_placement.py): 0 = fail at once; > 0 = wait up
    # to this many seconds for an autoscaler to add nodes, saying so on stderr, then fail
    placement_timeout_s: float = Field(default=0.0, ge=0)


DEFAULT_DECIDE_GROUP_MB = 256  # a group's decide task peaks near 2x this


class RunConfig(_Strict):
    name: str = "vila2-curate"
    engine: Literal["local", "ray", "beam"] = "local"
    batch_size: int = 256
    beam: BeamOptions = BeamOptions()
    ray: RayOptions = RayOptions()
    # how global stages decide: "partitioned" (groups in parallel, bounded memory; stages that implement
    # schemas.stage.PartitionedDecide) or "single" (one decide over all signatures: the reference)
    decide: Literal["partitioned", "single"] = "partitioned"
    # partitioned: the target partition bytes of one group (MiB); the runner forms enough groups for it
    # (pipelines/engine/group_size.py), at least the engine's own count. A group's task peaks near 2x this.
    decide_group_mb: float = Field(default=DEFAULT_DECIDE_GROUP_MB, gt=0)
    sources: list[SourceConfig]
    stages: list[StageConfig] = Field(default_factory=lambda: [NormalizeConfig()])
    output: OutputConfig

    def config_hash(self) -> str:
        """Hash of everything that changes the output (not the engine, the batch size or the decide path,
        which must all give the same output)."""
        exclude: dict[str, Any] = dict.fromkeys(("engine", "batch_size", "beam", "ray", "decide", "decide_group_mb"),
                                                 True)
        exclude["sources"] = {"__all__": {"fetch": _FETCH_SPEED_KNOBS}}
        payload = self.model_dump(mode="json", exclude=exclude)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _rebuild_run_config() -> None:
    """A stage registered after import (a plugin, a test) extends the union ``RunConfig.stages`` accepts."""
    RunConfig.model_fields["stages"].annotation = list[_stage_config_union()]
    RunConfig.model_rebuild(force=True)


on_register(_rebuild_run_config)


class ConfigError(ValueError):
    pass


def load_config(path: str | Path, overrides: dict[str, Any] | None = None, round: int | None = None) -> RunConfig:
    """Load and validate a YAML config; relative local paths resolve against the YAML's folder.

    ``round`` (the CLI's ``--round K``) sets every recaption stage's round and fills ``{round}`` and
    ``{prev_round}`` in source and output paths, so one config serves every round: round k reads round
    k-1's output and writes its own.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    raw.update(overrides or {})
    _apply_round(raw, round, str(path))
    _resolve_relative(raw, path.parent.resolve())
    return parse_config(raw, origin=str(path))


def parse_config(raw: dict[str, Any], origin: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"{origin}: invalid config\n" + "\n".join(lines)) from None


def _apply_round(raw: dict[str, Any], round_: int | None, origin: str) -> None:
    text = yaml.safe_dump(raw)
    if round_ is None:
        if "{round}" in text or "{prev_round}" in text:
            raise ConfigError(f"{origin}: paths use {{round}}/{{prev_round}}: run it with --round K")
        return
    if round_ < 1:
        raise ConfigError(f"{origin}: --round must be >= 1 (round 0 is the curated dataset)")

    def fill(v: Any) -> Any:
        return v.replace("{round}", str(round_)).replace("{prev_round}", str(round_ - 1)) if isinstance(v, str) else v

    for src in raw.get("sources") or []:
        if isinstance(src, dict) and isinstance(src.get("paths"), list):
            src["paths"] = [fill(p) for p in src["paths"]]
    if isinstance(raw.get("output"), dict):
        raw["output"]["path"] = fill(raw["output"].get("path"))
    if isinstance(raw.get("name"), str):
        raw["name"] = fill(raw["name"])
    for stage in raw.get("stages") or []:
        if isinstance(stage, dict) and stage.get("type") == "recaption":
            stage["round"] = round_


def _is_local_relative(p: str) -> bool:
    return "://" not in p and not p.startswith("/")


def _resolve_relative(raw: dict[str, Any], base: Path) -> None:
    for src in raw.get("sources") or []:
        if isinstance(src, dict):
            if isinstance(src.get("paths"), list):
                src["paths"] = [os.path.normpath(base / p) if isinstance(p, str) and _is_local_relative(p) else p
                                for p in src["paths"]]
            for k in ("image_root", "image_dir"):
                if isinstance(src.get(k), str) and _is_local_relative(src[k]):
                    src[k] = os.path.normpath(base / src[k])
    for stage in raw.get("stages") or []:
        if not isinstance(stage, dict):
            continue
        # model references that look like relative paths ("./x", "../x") are local checkpoints
        for holder in (stage, stage.get("captioner"), stage.get("vlm")):
            if not isinstance(holder, dict):
                continue
            for k in ("model", "pretrained", "small_model", "large_model", "processor"):
                v = holder.get(k)
                if isinstance(v, str) and v.startswith(("./", "../")):
                    holder[k] = os.path.normpath(base / v)
    out = raw.get("output")
    if isinstance(out, dict) and isinstance(out.get("path"), str) and _is_local_relative(out["path"]):
        out["path"] = os.path.normpath(base / out["path"])
