"""MONAI bundle glue: finding, loading and running bundles (:mod:`~volad.bundle.config`), what runs before a
bundle's job (:func:`start`: ``--help``, seeds, errors, torchrun) and checking overrides (:mod:`~volad.bundle.overrides`).

Every bundle's ``initialize`` step names :func:`volad.bundle.start`.
"""

from volad.bundle.config import bundle_config, run_bundle
from volad.bundle.startup import start

__all__ = ["bundle_config", "run_bundle", "start"]
