"""In-process VLM captioner: ``AutoProcessor`` + ``AutoModelForImageTextToText`` (LLaVA, Qwen2-VL, ...).

The prompt is the model's own chat template rendered for one user message holding an image and the
instruction, so every checkpoint gets the conversation format it was trained on. Generation is batched
with LEFT padding (decoder-only models continue from the last position, so padding must sit in front).
Samples are sorted by prompt length, which keeps padding — wasted compute — small, and each batch holds
as many as fit the device's memory (``recaption.backends.batching``; ``runtime.batch_size`` is the upper
bound). The processor (resize, normalise, tokenise) for the next batch runs on a CPU thread while the
model generates the current one (``recaption.backends.prefetch``). The same path loads real checkpoints
and the random models ``pipelines.demo.vlm`` builds, tiny or full size.

Determinism: greedy decoding by default; when sampling, ``torch.manual_seed`` is set per batch from the
configured seed and the batch's sample ids, so a rerun of the same batch samples the same tokens.
"""

from __future__ import annotations

import copy
import inspect
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vila2_curate.recaption.backends.base import CaptionerUnavailable, CaptionResult
from vila2_curate.recaption.backends.batching import SampleCost, device_budget, length_batches, sample_cost
from vila2_curate.recaption.backends.hf_loading import hub_snapshot, oom_types, resolve_model_class
from vila2_curate.recaption.backends.prefetch import ahead, pinned
from vila2_curate.recaption.runtime import derive_seed, reason_detail, resolve_device, resolve_dtype
from vila2_curate.schemas.config import CaptionerConfig
from vila2_curate.schemas.demo_model import is_demo_model


class TransformersCaptioner:
    """Caption images with a transformers VLM; ``load()`` once per worker, then ``generate`` per batch."""

    def __init__(self, cfg: CaptionerConfig) -> None:
        self.cfg = cfg
        self.model: Any = None
        self.identity: dict[str, Any] = {}
        self.fixed_new_tokens: int | None = None  # benchmarks: every sample generates this many tokens
        self.memory_budget: int | None = None  # bytes for one batch; set by load() on CUDA
        self._cost: SampleCost | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._ready: dict[tuple[str, ...], Future] = {}

    # -- loading ---------------------------------------------------------------------------------------
    def load(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoProcessor

        cfg = self.cfg
        self.device = resolve_device(cfg.runtime)
        self.dtype = resolve_dtype(cfg.runtime, self.device)
        model_cls = resolve_model_class(cfg.model, cfg.trust_remote_code)
        self.processor = AutoProcessor.from_pretrained(
            cfg.processor or cfg.model, trust_remote_code=cfg.trust_remote_code
        )
        tok = self.tokenizer = getattr(self.processor, "tokenizer", None)
        if tok is None:
            raise ValueError(f"{cfg.model}: the processor has no tokenizer; not an image-text-to-text model")
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        if tok.pad_token is None:
            raise ValueError(f"{cfg.model}: tokenizer has no pad, eos or unk token to pad batches with")
        self.chat_template = getattr(self.processor, "chat_template", None) or tok.chat_template
        if not self.chat_template:
            raise ValueError(
                f"{cfg.model}: neither the processor nor the tokenizer has a chat template; a VLM prompt "
                "needs the model's own conversation format (add chat_template.jinja to the checkpoint)"
            )
        model = model_cls.from_pretrained(
            cfg.model, dtype=self.dtype, trust_remote_code=cfg.trust_remote_code
        )
        self.model = model.to(self.device).eval().requires_grad_(False)
        gen_eos = self.model.generation_config.eos_token_id
        eos = set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        self.eos_ids = sorted(eos)
        params = inspect.signature(self.model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self._rendered: dict[tuple[str, bool], str] = {}
        self._image_tokens: dict[tuple[int, int], int] = {}
        self._text_tokens: dict[tuple[str, bool], int] = {}
        self._cost = sample_cost(self.model.config, self.model.dtype.itemsize)
        self.memory_budget = device_budget(self.model, self.device)
        # one thread with its own processor copy: processors change their tokenizer's padding state
        self._prep_processor = copy.deepcopy(self.processor)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-prepare")
        rendered = self._render("x", True)
        # a template that writes BOS itself must not get a second one from the tokenizer
        self._add_special = not (tok.bos_token and rendered.startswith(tok.bos_token))
        folder = Path(cfg.model) if Path(cfg.model).is_dir() else hub_snapshot(cfg.model)
        self.identity = {
            "backend": "transformers",
            "model": cfg.model,
            "model_class": type(self.model).__name__,
            "demo": is_demo_model(folder),
        }

    # -- prompts ---------------------------------------------------------------------------------------
    def _render(self, prompt: str, with_image: bool) -> str:
        """Chat-template text for one user turn (image first, then the instruction) + generation prompt."""
        key = (prompt, with_image)
        if key not in self._rendered:
            content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
            content.append({"type": "text", "text": prompt})
            messages = [{"role": "user", "content": content}]
            if getattr(self.processor, "chat_template", None):
                text = self.processor.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            else:
                text = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            self._rendered[key] = text
        return self._rendered[key]

    def _n_image_tokens(self, image: Any) -> int:
        """Placeholder tokens the processor will expand one image into (0 when it cannot say)."""
        if image is None:
            return 0
        size = (image.height, image.width)
        if size not in self._image_tokens:
            try:
                mm = self.processor._get_num_multimodal_tokens(image_sizes=[list(size)])
                self._image_tokens[size] = int(mm.num_image_tokens[0])
            except Exception:  # noqa: BLE001 - only a batching hint
                self._image_tokens[size] = 0
        return self._image_tokens[size]

    def _length(self, prompt: str, image: Any) -> int:
        """Prompt tokens of one sample (rendered prompt + image placeholders); memoised per prompt."""
        key = (prompt, image is not None)
        if key not in self._text_tokens:
            rendered = self._render(prompt, image is not None)
            ids = self.tokenizer(rendered, add_special_tokens=self._add_special)["input_ids"]
            self._text_tokens[key] = len(ids)
        return self._text_tokens[key] + self._n_image_tokens(image)

    def _encode(self, images: list[Any], texts: list[str], processor: Any = None) -> dict[str, Any]:
        """Processor outputs for one batch (left padded) on the CPU; pinned when a GPU will read them."""
        with_images = images[0] is not None
        batch = (processor or self.processor)(
            images=images if with_images else None,
            text=texts,
            padding=True,
            padding_side="left",
            add_special_tokens=self._add_special,
            return_tensors="pt",
        )
        batch = dict(batch.items())
        return pinned(batch) if self.device.type == "cuda" else batch

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """On the device; float tensors in the model dtype."""
        out = {}
        for k, v in batch.items():
            if hasattr(v, "to"):
                v = v.to(self.device, non_blocking=True)
                if v.is_floating_point():
                    v = v.to(self.dtype)
            out[k] = v
        return out

    def _inputs(self, images: list[Any], texts: list[str]) -> dict[str, Any]:
        """Processor outputs for one batch (left padded), on the device; float tensors in the model dtype."""
        return self._to_device(self._encode(images, texts))

    def _batches(self, lengths: list[int], groups: list[Any], new_tokens: int = 0) -> list[list[int]]:
        """Indices sorted by (group, prompt length), each batch as many as memory allows (at most
        runtime.batch_size); deterministic."""
        return length_batches(lengths, groups, self.cfg.runtime.batch_size, self.memory_budget, self._cost,
                              new_tokens)

    # -- generation ------------------------------------------------------------------------------------
    def generate(
        self,
        images: list[Any],
        prompts: list[str],
        sample_ids: list[str] | None = None,
        min_new_tokens: int | None = None,
    ) -> list[CaptionResult]:
        """One caption per (PIL image, prompt), in input order.

        A batch that raises is retried sample by sample, so one bad sample fails alone (its result carries
        ``error``); out-of-memory on a single sample raises :class:`CaptionerUnavailable` instead.
        ``min_new_tokens`` (benchmarks; default ``fixed_new_tokens``) forces every sample to generate the
        same length. The processor inputs of the next batch are built on a thread meanwhile.
        """
        self.load()
        n = len(images)
        ids = sample_ids or [str(i) for i in range(n)]
        if min_new_tokens is None:
            min_new_tokens = self.fixed_new_tokens
        lengths = [self._length(p, im) for p, im in zip(prompts, images, strict=True)]
        results: list[CaptionResult | None] = [None] * n
        chunks = self._batches(lengths, [im is not None for im in images], self.cfg.generation.max_new_tokens)

        def prepare(chunk: list[int]) -> dict[str, Any]:
            imgs = [images[i] for i in chunk]
            texts = [self._rendered[(prompts[i], imgs[0] is not None)] for i in chunk]
            return self._encode(imgs, texts, self._prep_processor)

        for p, im in zip(prompts, images, strict=True):
            self._render(p, im is not None)  # the thread only reads the cache
        for chunk, ready in ahead(chunks, prepare, self._pool):
            key = tuple(ids[i] for i in chunk)
            self._ready[key] = ready
            try:
                outs = self._generate_batch(
                    [images[i] for i in chunk],
                    [prompts[i] for i in chunk],
                    [ids[i] for i in chunk],
                    min_new_tokens,
                )
            except Exception as e:  # noqa: BLE001 - isolate the failing sample below
                if len(chunk) == 1:
                    if isinstance(e, oom_types()):
                        raise CaptionerUnavailable(
                            f"out of memory on a single sample: {reason_detail(e)}"
                        ) from e
                    outs = [CaptionResult(error=reason_detail(e))]
                else:
                    outs = [
                        self.generate([images[i]], [prompts[i]], [ids[i]], min_new_tokens)[0] for i in chunk
                    ]
            finally:
                self._ready.pop(key, None)
            for i, r in zip(chunk, outs, strict=True):
                results[i] = r
        return results  # type: ignore[return-value]

    def generation_config(self, min_new_tokens: int | None = None):  # -> transformers.GenerationConfig
        """The checkpoint's generation config overridden by ours (greedy unless do_sample)."""
        g = self.cfg.generation
        gc = copy.deepcopy(self.model.generation_config)
        gc.max_new_tokens = g.max_new_tokens
        gc.min_new_tokens = min_new_tokens
        gc.do_sample = g.do_sample
        gc.repetition_penalty = g.repetition_penalty
        gc.num_beams = 1
        gc.pad_token_id = self.tokenizer.pad_token_id
        gc.eos_token_id = self.eos_ids or None
        if g.do_sample:
            gc.temperature, gc.top_p = g.temperature, g.top_p
        else:  # neutral values: checkpoint sampling defaults (e.g. Qwen2-VL's) must not warn or leak in
            gc.temperature, gc.top_p, gc.top_k = 1.0, 1.0, None
        return gc

    def _generate_batch(
        self, images: list[Any], prompts: list[str], ids: list[str], min_new_tokens: int | None
    ) -> list[CaptionResult]:
        import torch

        ready = self._ready.pop(tuple(ids), None)
        texts = [self._render(p, images[0] is not None) for p in prompts]
        inputs = self._to_device(ready.result() if ready is not None else self._encode(images, texts))
        g = self.cfg.generation
        if g.do_sample:
            torch.manual_seed(derive_seed(g.seed, *ids))
        with torch.inference_mode():
            out = self.model.generate(**inputs, generation_config=self.generation_config(min_new_tokens))
        new = out[:, inputs["input_ids"].shape[1] :].tolist()
        eos = set(self.eos_ids)
        results = []
        for row in new:
            cut = next((k for k, t in enumerate(row) if t in eos), None)
            n_tok = len(row) if cut is None else cut
            text = self.tokenizer.decode(row[:n_tok], skip_special_tokens=True).strip()
            results.append(CaptionResult(text, n_tok, cut is None and len(row) >= g.max_new_tokens))
        return results

    # -- scoring ---------------------------------------------------------------------------------------
    def log_likelihood(
        self,
        images: list[Any],
        prompts: list[str],
        texts: list[str | None],
        max_text_tokens: int | None = None,
    ) -> list[float | None]:
        """Per sample: mean over the text's tokens of log p(token | image, prompt, earlier text tokens).

        The text is the assistant's answer after the rendered prompt (what the VLM is trained to produce).
        An image of None scores the text after a text-only prompt. Batches are left padded with explicit
        position ids (the same ones generation computes), so a score does not depend on its batch. None
        where the text is empty.
        """
        self.load()
        n = len(texts)
        out: list[float | None] = [None] * n
        todo = [i for i in range(n) if texts[i] and texts[i].strip()]
        full: dict[int, str] = {}
        n_text: dict[int, int] = {}
        lengths: dict[int, int] = {}
        for i in todo:
            rendered = self._render(prompts[i], images[i] is not None)
            sep = "" if rendered[-1:].isspace() else " "
            text = texts[i].strip()
            if max_text_tokens:
                t_ids = self.tokenizer(sep + text, add_special_tokens=False)["input_ids"]
                if len(t_ids) > max_text_tokens:
                    text = self.tokenizer.decode(t_ids[:max_text_tokens], skip_special_tokens=True).strip()
            p_len = len(self.tokenizer(rendered, add_special_tokens=self._add_special)["input_ids"])
            f_len = len(
                self.tokenizer(rendered + sep + text, add_special_tokens=self._add_special)["input_ids"]
            )
            if f_len - p_len < 1:
                continue
            full[i], n_text[i] = rendered + sep + text, f_len - p_len
            lengths[i] = f_len + self._n_image_tokens(images[i])
        keys = [i for i in todo if i in full]
        for chunk in self._batches([lengths[i] for i in keys], [images[i] is not None for i in keys]):
            rows = [keys[j] for j in chunk]
            scores = self._score_batch(
                [images[i] for i in rows], [full[i] for i in rows], [n_text[i] for i in rows]
            )
            for i, s in zip(rows, scores, strict=True):
                out[i] = s
        return out

    def _score_batch(self, images: list[Any], texts: list[str], n_text: list[int]) -> list[float]:
        import torch

        inputs = self._inputs(images, texts)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        keep = max(n_text) + 1
        kwargs: dict[str, Any] = {"use_cache": False}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = keep
        with torch.inference_mode():
            positions = self._position_ids(inputs)
            if positions is not None:
                kwargs["position_ids"] = positions
            logits = self.model(**inputs, **kwargs).logits
        k = logits.shape[1]
        scores = []
        for r, m in enumerate(n_text):
            if int(mask[r, -m:].sum()) != m:
                raise RuntimeError("scored tokens overlap padding; the processor did not pad on the left")
            part = logits[r, k - m - 1 : k - 1].float().log_softmax(-1)
            lp = part.gather(-1, ids[r, -m:, None]).squeeze(-1)
            scores.append(float(lp.double().mean()))
        return scores

    def _position_ids(self, inputs: dict[str, Any]):  # -> torch.Tensor | None
        """Position ids as ``generate`` computes them (multimodal RoPE included), so padding is invisible."""
        prepare = getattr(self.model, "_prepare_position_ids_for_generation", None)
        if prepare is not None:
            try:
                return prepare(inputs["input_ids"], dict(inputs))
            except Exception:  # noqa: BLE001 - fall back to plain 1-D positions from the mask
                pass
        mask = inputs["attention_mask"]
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.model, self._pool = None, None
