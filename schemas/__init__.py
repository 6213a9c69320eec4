"""The data contract of vila2-curate: Arrow schemas, records, config models and the stage protocol.

Nothing here imports other vila2-curate packages, so every layer can depend on it.
"""

from vila2_curate.schemas.rows import (
    CAPTION_TYPE,
    DOC_IMAGE_TYPE,
    DOCUMENT_SCHEMA,
    PAIR_SCHEMA,
    SCHEMA_VERSION,
    SchemaVersionError,
    check_schema_version,
    empty_table,
    make_table,
)
from vila2_curate.schemas.stage import GlobalStage, Resources, Stage

__all__ = [
    "CAPTION_TYPE",
    "DOC_IMAGE_TYPE",
    "DOCUMENT_SCHEMA",
    "PAIR_SCHEMA",
    "SCHEMA_VERSION",
    "GlobalStage",
    "Resources",
    "SchemaVersionError",
    "Stage",
    "check_schema_version",
    "empty_table",
    "make_table",
]
