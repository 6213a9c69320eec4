"""vila2-curate: the VILA^2 data recipe with NVILA's DeltaLoss pruning, as one installed namespace.

The code lives in the repository's top-level folders (schemas/, curation/, recaption/, specialists/,
pipelines/); pyproject.toml installs each as ``vila2_curate.<folder>`` (setuptools ``package-dir``), so a
user's environment gains only this one top-level name. This file lives in src/, not in a top-level
``vila2_curate/`` folder: a checkout on sys.path (``ray job submit --working-dir .`` puts it there) would
otherwise shadow the installed package.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vila2-curate")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
