"""The writer's caption policy, kept importable here for pipelines/io/writers/wds.py; it lives in schemas.captions.

schemas/captions.py is the one module for caption selection (what each stage judges, and the ``.txt``).
"""

from vila2_curate.schemas.captions import (  # noqa: F401 - re-exports
    BAD_FLAGS,
    choose_caption,
    choose_caption_source,
    has_usable_caption,
    latest_usable_caption,
    mix_draw,
    publish_problem,
)
