"""Loading a transformers VLM: which Auto class (and whether remote code is needed), hub snapshots, OOM."""

from __future__ import annotations

from pathlib import Path

from vila2_curate.recaption.backends.base import RemoteCodeRequired

# Auto classes a remote-code checkpoint may register for a VLM, best first. NVILA-*-hf registers AutoModel.
_REMOTE_AUTO_CLASSES = (
    "AutoModelForImageTextToText",
    "AutoModelForVision2Seq",
    "AutoModelForCausalLM",
    "AutoModel",
)


def oom_types() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.cuda.OutOfMemoryError, MemoryError)


def resolve_model_class(model: str, trust_remote_code: bool):  # -> an Auto class
    """The Auto class to load ``model`` with; fails clearly when its config needs code we may not run.

    A config whose ``model_type`` is built into this transformers loads with the built-in class (even if it
    also carries an ``auto_map``). One that is not, but maps to custom code (``auto_map``), needs
    ``trust_remote_code``; we refuse unless the captioner config sets it.
    """
    import transformers
    from transformers import AutoModelForImageTextToText, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_dict, _ = PretrainedConfig.get_config_dict(model)
    model_type = config_dict.get("model_type")
    auto_map = config_dict.get("auto_map") or {}
    if model_type in CONFIG_MAPPING:
        return AutoModelForImageTextToText
    if not auto_map:
        raise ValueError(
            f"{model}: model_type {model_type!r} is not known to transformers {transformers.__version__} "
            "and the config has no auto_map (custom code); upgrade transformers or use the openai backend "
            "(SGLang/vLLM)"
        )
    if not trust_remote_code:
        raise RemoteCodeRequired(
            f"{model}: model_type {model_type!r} is not built into transformers {transformers.__version__}; "
            f"its config.json maps to custom code ({', '.join(sorted(auto_map))}). Set "
            "captioner.trust_remote_code: true only if you have reviewed and trust that repository's code."
        )
    for name in _REMOTE_AUTO_CLASSES:
        if name in auto_map:
            return getattr(transformers, name)
    raise ValueError(f"{model}: auto_map registers none of {', '.join(_REMOTE_AUTO_CLASSES)}")


def hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a hub model (already downloaded by from_pretrained), if any."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached as a full snapshot: no demo marker to look for
        return None
