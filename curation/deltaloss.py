"""NVILA DeltaLoss: score each sample with a small and a large LM, keep the top K per subset by the gap.

``delta_loss = logp_large - logp_small``, each the *mean* per-token log-likelihood of the row's text under
that model (its own tokenizer). A large gap means the text is learnable but not trivial: the large model
finds it much more predictable than the small one, whereas noise is hard for both and boilerplate is easy
for both. Two stages:

- ``DeltaLossScoreStage`` (map): sets logp_small, logp_large, delta_loss on alive rows. Pairs score
  ``schemas.captions.TEXT_DELTALOSS_CAPTION`` (the newest ``captions`` entry as written, else ``text``); MMC4 documents the sentences joined by spaces.
  Texts are truncated to ``max_length`` tokens, batched with left padding, attention masks and explicit
  position ids, so a row's score does not depend on what it was batched with.
- ``DeltaLossTopKStage`` (global): keeps ``ceil(keep_fraction * n)`` rows per subset, ties by key.
  Partitioned decide (curation/cutoffs.py): ``method: exact`` ranks each subset whole on one worker with
  ``decide`` (identical decisions); ``method: sketch`` merges one KLL sketch per subset and shard and each
  shard drops its rows below the merged cut (rank error ~1.3%, ties at the cut kept, unscored rows
  dropped whenever the subset is cut at all).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import torch

from vila2_curate.curation import cutoffs
from vila2_curate.curation.models import load_causal_lm, resolve_device, resolve_dtype
from vila2_curate.schemas.captions import TEXT_DELTALOSS_CAPTION, judged_texts
from vila2_curate.schemas.config import DeltaLossConfig
from vila2_curate.schemas.documents import document_text
from vila2_curate.schemas.rows import DECISION_SCHEMA
from vila2_curate.schemas.stage import StageBase
from vila2_curate.schemas.table_ops import replace_columns

# float32 elements of [rows, seq, vocab] log-softmax materialised at once (CPU; larger on a GPU)
_LOGSOFTMAX_BUDGET = {"cpu": 64 << 20, "cuda": 256 << 20}


class CausalLMScorer:
    """Mean token log-likelihood of texts under one causal LM, batched, padding-invariant."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, max_length: int, batch_size: int, device: torch.device
    ) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_length, self.batch_size = max_length, batch_size

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids with BOS in front (when the tokenizer has one), truncated to max_length.

        BOS gives the first word a context to be predicted from; without one the first token is unscored.
        """
        tok = self.tokenizer
        bos = tok.bos_token_id
        out = []
        for ids in tok(texts, add_special_tokens=True, truncation=True, max_length=self.max_length)[
            "input_ids"
        ]:
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
            out.append(ids[: self.max_length])
        return out

    def mean_logprobs(self, texts: list[str | None]) -> list[float | None]:
        """Per text: mean log p(token | prefix) over tokens after the first; None when nothing to score."""
        return self.launch(texts)()

    def launch(self, texts: list[str | None]) -> Callable[[], list[float | None]]:
        """Queue every batch of :meth:`mean_logprobs` on the device without waiting for it; the returned
        function waits once and gives the scores (a second model's batches can be queued meanwhile)."""
        out: list[float | None] = [None] * len(texts)
        todo = [j for j, t in enumerate(texts) if t]
        encoded = [
            (j, ids)
            for j, ids in zip(todo, self.encode([texts[j] for j in todo]), strict=True)
            if len(ids) >= 2
        ]
        # longest first: similar lengths share a batch (less padding); stable sort keeps it deterministic
        encoded.sort(key=lambda e: -len(e[1]))
        parts = [self._batch([ids for _, ids in encoded[s : s + self.batch_size]])
                 for s in range(0, len(encoded), self.batch_size)]

        def result() -> list[float | None]:
            values = torch.cat(parts).tolist() if parts else []
            for (j, _), value in zip(encoded, values, strict=True):
                out[j] = value
            return out

        return result

    @torch.inference_mode()
    def _batch(self, seqs: list[list[int]]) -> torch.Tensor:
        """Mean log-probabilities of one left-padded batch, as a float64 tensor left on the device."""
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):  # left padding, as the tokenizer is configured
            ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens at 0..len-1 whatever the padding
        cuda = self.device.type == "cuda"
        ids, mask, positions = ((t.pin_memory() if cuda else t).to(self.device, non_blocking=cuda)
                                for t in (ids, mask, positions))
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
        ).logits
        targets = ids[:, 1:]
        scored = (mask[:, 1:] * mask[:, :-1]).bool()  # a target needs a real token before it
        vocab = logits.shape[-1]
        budget = _LOGSOFTMAX_BUDGET.get(self.device.type, _LOGSOFTMAX_BUDGET["cpu"])
        rows_per_step = max(1, budget // max(1, width * vocab))
        sums = torch.zeros(len(seqs), dtype=torch.float64, device=self.device)
        for r0 in range(0, len(seqs), rows_per_step):
            part = logits[r0 : r0 + rows_per_step, :-1].float().log_softmax(-1)
            lp = part.gather(-1, targets[r0 : r0 + rows_per_step, :, None]).squeeze(-1)
            sums[r0 : r0 + rows_per_step] = (lp * scored[r0 : r0 + rows_per_step]).sum(
                -1, dtype=torch.float64
            )
        counts = scored.sum(-1)
        return sums / counts


class DeltaLossScoreStage(StageBase):
    """Map stage: logp_small, logp_large and delta_loss on alive rows.

    ``setup()`` loads both causal LMs (and tokenizers) on one device in ``runtime.precision`` (fp16/bf16
    on GPU only): worker memory is about the two models' weights plus one batch of logits
    (batch_size x max_length x vocab in the model dtype).
    """

    name = "deltaloss_score"
    version = "1"
    loads_model = True  # engines route it like a model (Beam RunInference, GPU actor pools)

    def __init__(self, cfg: DeltaLossConfig) -> None:
        if cfg.scorer == "vlm":
            raise NotImplementedError(
                "deltaloss scorer 'vlm' (caption log-likelihood given the image) is not implemented yet; "
                "use scorer: lm"
            )
        self.cfg = cfg
        self.small: CausalLMScorer | None = None
        self.large: CausalLMScorer | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Ship the config only: engines pickle stages to workers, which call setup() themselves."""
        keep = {"cfg", "resources", "name"}  # name: the planner renames repeated stages per instance
        return {k: v for k, v in self.__dict__.items() if k in keep} | {"small": None, "large": None}

    def setup(self) -> None:
        if self.small is not None:
            return
        rt = self.cfg.runtime
        self.device = resolve_device(rt)
        dtype = resolve_dtype(rt, self.device)
        self.identities = {}
        for which, path in (("small", self.cfg.small_model), ("large", self.cfg.large_model)):
            b = load_causal_lm(path, self.device, dtype, self.cfg.trust_remote_code)
            self.identities[which] = b.identity
            setattr(
                self,
                which,
                CausalLMScorer(b.model, b.tokenizer, self.cfg.max_length, rt.batch_size, self.device),
            )

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.setup()
        drop = batch.column("drop_reason").to_pylist()
        todo = [i for i, r in enumerate(drop) if r is None]
        if not todo:
            return batch
        if "text_list" in batch.column_names:
            texts = [document_text(t) for t in batch.column("text_list").take(todo).to_pylist()]
        else:
            texts = judged_texts(TEXT_DELTALOSS_CAPTION, batch.column("captions").take(todo).to_pylist(),
                                 batch.column("text").take(todo).to_pylist())
        small_scores = self.small.launch(texts)  # both models' batches queued before either is read
        large_scores = self.large.launch(texts)
        small, large = small_scores(), large_scores()
        cols = {c: batch.column(c).to_pylist() for c in ("logp_small", "logp_large", "delta_loss")}
        for j, i in enumerate(todo):
            s, lg = small[j], large[j]
            cols["logp_small"][i], cols["logp_large"][i] = s, lg
            cols["delta_loss"][i] = None if s is None or lg is None else lg - s
        return replace_columns(batch, cols)


SIGNATURE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("key", pa.string()),
        pa.field("image_index", pa.int32()),
        pa.field("subset", pa.string()),
        pa.field("delta_loss", pa.float64()),
    ]
)
MISSING_SUBSET = "<none>"


class DeltaLossTopKStage(cutoffs.CutoffDecide, StageBase):
    """GlobalStage: per subset keep the top ``ceil(keep_fraction * n)`` rows by delta_loss.

    Ties are broken by (key, source), rows without a delta_loss (no text to score) rank last, so the
    decision depends only on the set of signatures, never on their order or the engine.
    """

    name = "deltaloss"
    version = "1"
    group_by = "subset"

    def __init__(self, cfg: DeltaLossConfig) -> None:
        if not 0 < cfg.keep_fraction <= 1:
            raise ValueError(f"deltaloss keep_fraction must be in (0, 1], got {cfg.keep_fraction}")
        self.cfg = cfg
        if cfg.method == "sketch":
            cutoffs.require_datasketches()

    def setup(self) -> None:
        """No model: the scores come from DeltaLossScoreStage."""

    def signatures(self, batch: pa.Table) -> pa.Table:
        drop = batch.column("drop_reason").to_pylist()
        keep = [i for i, r in enumerate(drop) if r is None]
        sub = batch.take(pa.array(keep, type=pa.int64()))
        subsets = self._subsets(sub)
        return pa.table(
            {
                "source": sub.column("source").to_pylist(),
                "key": sub.column("key").to_pylist(),
                "image_index": [-1] * sub.num_rows,
                "subset": subsets,
                "delta_loss": sub.column("delta_loss").to_pylist(),
            },
            schema=SIGNATURE_SCHEMA,
        )

    def _subsets(self, batch: pa.Table) -> list[str]:
        by = self.cfg.subset_by
        if by.startswith("meta."):
            field = by[len("meta.") :]
            out = []
            for m in batch.column("meta").to_pylist():
                v = json.loads(m).get(field) if m else None
                out.append(MISSING_SUBSET if v is None else str(v))
            return out
        if by not in batch.column_names:
            raise KeyError(f"deltaloss subset_by {by!r} is neither a row column nor 'meta.<field>'")
        return [MISSING_SUBSET if v is None else str(v) for v in batch.column(by).to_pylist()]

    def decide(self, signatures: pa.Table) -> pa.Table:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in signatures.to_pylist():
            groups.setdefault(r["subset"], []).append(r)
        out: list[dict[str, Any]] = []
        for subset in sorted(groups):
            rows = groups[subset]
            n = len(rows)
            k = math.ceil(self.cfg.keep_fraction * n - 1e-9)
            rows.sort(
                key=lambda r: (
                    r["delta_loss"] is None,
                    -(r["delta_loss"] if r["delta_loss"] is not None else 0.0),
                    r["key"],
                    r["source"],
                )
            )
            cut = rows[k - 1]["delta_loss"] if k > 0 else None
            for rank, r in enumerate(rows[k:], start=k + 1):
                d = r["delta_loss"]
                what = "unscored (no text)" if d is None else f"{d:.4f}"
                out.append(
                    {
                        "source": r["source"],
                        "key": r["key"],
                        "image_index": -1,
                        "drop_reason": f"deltaloss_below_top_k: {what} ranks {rank} > k={k} of {n} "
                        f"in subset {subset!r} (cut {'none' if cut is None else f'{cut:.4f}'})",
                        "flag": None,
                        "group": subset,
                        "value": cut,
                    }
                )
        out.sort(key=lambda d: (d["source"], d["key"]))
        return pa.Table.from_pylist(out, schema=DECISION_SCHEMA)

    # -- partitioned decide (schemas.stage.PartitionedDecide; curation/cutoffs.py) -----------------------
    def _keep_count(self, n: int) -> int:
        return math.ceil(self.cfg.keep_fraction * n - 1e-9)

    def partition(self, signatures: pa.Table) -> pa.Table:
        if self.cfg.method == "exact":
            return cutoffs.exact_partition(signatures, self.group_by)
        groups = signatures.column("subset").to_pylist()
        return cutoffs.sketch_partition(groups, signatures.column("delta_loss").to_pylist())

    def shard_decisions(self, combined: pa.Table, signatures: pa.Table) -> pa.Table:
        if self.cfg.method == "exact":
            return combined.select(DECISION_SCHEMA.names).cast(DECISION_SCHEMA)
        groups = cutoffs.sketch_groups(combined)
        cuts: dict[str, tuple[int, int, float | None]] = {}
        err = cutoffs.rank_error()
        out = []
        for subset, source, key, d in zip(*(signatures.column(c).to_pylist()
                                            for c in ("subset", "source", "key", "delta_loss")), strict=True):
            if subset not in cuts:
                n, blob = groups[subset]
                k = self._keep_count(n)
                cuts[subset] = (n, k, cutoffs.top_k_cut(blob, k) if k < n else None)
            n, k, cut = cuts[subset]
            if k >= n:
                continue
            if d is None or (cut is not None and d < cut):
                what = "unscored (no text)" if d is None else f"{d:.4f}"
                out.append({"source": source, "key": key, "image_index": -1, "flag": None, "group": subset,
                            "value": cut,
                            "drop_reason": f"deltaloss_below_top_k: {what} < cut "
                            f"{'none' if cut is None else f'{cut:.4f}'} (k={k} of {n} in subset {subset!r}, "
                            f"KLL sketch, rank error +-{err:.2%})"})
        out.sort(key=lambda r: (r["source"], r["key"]))
        return pa.Table.from_pylist(out, schema=DECISION_SCHEMA)

    def summarize(self, decisions: pa.Table, signatures: pa.Table) -> dict[str, Any]:
        seen: dict[str, int] = {}
        for s in signatures.column("subset").to_pylist():
            seen[s] = seen.get(s, 0) + 1
        dropped: dict[str, int] = {}
        cuts: dict[str, float | None] = {}
        for g, v in zip(
            decisions.column("group").to_pylist(), decisions.column("value").to_pylist(), strict=True
        ):
            dropped[g] = dropped.get(g, 0) + 1
            cuts[g] = v
        method = cutoffs.method_summary(self.cfg.method)
        return {
            **method,
            "subsets": {
                s: {
                    "rows": n,
                    "kept": n - dropped.get(s, 0),
                    "dropped": dropped.get(s, 0),
                    "cut": cuts.get(s),
                }
                for s, n in sorted(seen.items())
            }
        }
