"""What every captioner backend returns, and the errors that must fail a batch instead of a sample."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionResult:
    """One generation. ``error`` set: this sample failed on its own (the stage quarantines the row)."""

    text: str = ""
    n_generated_tokens: int = 0
    hit_max_tokens: bool = False  # stopped at max_new_tokens (finish_reason "length"), not at EOS
    error: str | None = None


class CaptionerUnavailable(RuntimeError):
    """The backend itself failed (server down after all retries, out of memory): not the sample's fault.

    Raised, never turned into a per-row quarantine, so the engine fails the batch and a resume retries it
    instead of silently losing every row of an outage.
    """


class RemoteCodeRequired(ValueError):
    """The checkpoint's config needs custom modelling code and ``trust_remote_code`` is not set."""
