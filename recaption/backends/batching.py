"""Generation batches cut by device memory: samples sorted by prompt length, each batch as large as fits.

A fixed count either wastes the GPU (short prompts: room for many more) or runs out of memory (long
prompts, many image tokens). What a sample costs is known from the model config: its KV cache for
prompt + new tokens, one layer's transient activations and attention scores over the prompt (prefill;
eager attention only, SDPA kernels do not materialise them), and the last position's logits in fp32.
The budget is computed from the device's *total* memory and the weights, never from what happens to be
free, so the same input gives the same batches on the same GPU model (sampled captions are seeded per
batch). ``runtime.batch_size`` stays an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1 << 30
DEVICE_FRACTION = 0.9  # of total device memory; the rest is the CUDA context and allocator slack
RESERVE_BYTES = 1 * GIB  # kernels' workspaces, fragmentation


@dataclass(frozen=True)
class SampleCost:
    """Bytes one sample needs during generation, from the text model's shapes."""

    kv_per_token: int  # K and V of every layer
    act_per_token: int  # one layer's hidden states, MLP intermediates and QKV at prefill
    attn_per_token2: int  # attention scores of one layer (heads x L x L, fp32) at prefill; eager only
    logits: int  # last-position logits in fp32, plus the processors' copy

    def bytes(self, prompt_len: int, new_tokens: int) -> int:
        return ((prompt_len + new_tokens) * self.kv_per_token + prompt_len * self.act_per_token
                + prompt_len * prompt_len * self.attn_per_token2 + self.logits)


def sample_cost(config: Any, dtype_bytes: int) -> SampleCost:
    """The :class:`SampleCost` of a (multimodal) causal LM config; its text model decides."""
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, heads = int(tc.hidden_size), int(tc.num_attention_heads)
    kv_heads = int(getattr(tc, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(tc, "head_dim", None) or hidden // heads)
    layers = int(tc.num_hidden_layers)
    inter = int(getattr(tc, "intermediate_size", None) or 4 * hidden)
    return SampleCost(
        kv_per_token=2 * layers * kv_heads * head_dim * dtype_bytes,
        act_per_token=(4 * hidden + 3 * inter) * dtype_bytes,
        attn_per_token2=heads * 4 if getattr(tc, "_attn_implementation", None) == "eager" else 0,
        logits=int(tc.vocab_size) * 4 * 2,
    )


def device_budget(model: Any, device: Any) -> int | None:
    """Bytes left for batches on a CUDA device after the weights; None on CPU (count cap only)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    return max(0, int(total * DEVICE_FRACTION) - weights - RESERVE_BYTES)


def length_batches(lengths: list[int], groups: list[Any], cap: int, budget: int | None,
                   cost: SampleCost | None, new_tokens: int) -> list[list[int]]:
    """Indices sorted by (group, prompt length, index), cut where the group changes, ``cap`` samples are
    reached, or the batch padded to its longest prompt would exceed ``budget``; deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (str(groups[i]), lengths[i], i))
    cap = max(1, cap)
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < cap and groups[out[-1][0]] == groups[i]:
            if budget is None or cost is None:
                out[-1].append(i)
                continue
            longest = max(lengths[out[-1][-1]], lengths[i])  # sorted: the newcomer is the longest
            if (len(out[-1]) + 1) * cost.bytes(longest, new_tokens) <= budget:
                out[-1].append(i)
                continue
        out.append([i])
    return out
