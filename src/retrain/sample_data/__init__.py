"""Small photo set bundled with retrain, so ``retrain`` runs with no ``--image_dir``.

``photos/<class>/*.jpg``: four classes (animals, fish, landmarks, tools) of real,
public-domain / CC0 photos taken from Debian's ``gcompris-qt-data`` package;
see ``ATTRIBUTION.md`` for the per-file sources and licences, and
``tools/make_sample_data.py`` in the source repository to rebuild them.
"""

from __future__ import annotations

import atexit
import functools
import pathlib
from contextlib import ExitStack
from importlib.resources import as_file, files

__all__ = ["sample_image_dir"]


@functools.lru_cache(maxsize=1)
def sample_image_dir() -> pathlib.Path:
    """Path of the bundled photo folder (one sub-folder per class).

    Uses :func:`importlib.resources.files`, so it works from a source checkout and
    from an installed wheel. If the package is imported from a zip file, the folder
    is extracted once to a temporary location that lives until the process exits.
    """
    resource = files(__name__).joinpath("photos")
    if isinstance(resource, pathlib.Path):
        return resource
    stack = ExitStack()
    atexit.register(stack.close)
    return pathlib.Path(stack.enter_context(as_file(resource)))
