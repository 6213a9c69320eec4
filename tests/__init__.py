"""The test suite, one package per area (io, engine, curation, recaption, project)."""
