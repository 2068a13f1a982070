"""Running a method: training (:class:`Trainer`), mapping (:class:`Inferer`), building a fusion (:class:`FusionBuilder`).

The bundles name these faces (``volad.engine.Trainer``, ``volad.engine.Inferer``, ``volad.engine.FusionBuilder``).
"""

from volad.engine.fusion_builder import FusionBuilder
from volad.engine.inferer import Inferer
from volad.engine.trainer import Trainer

__all__ = ["FusionBuilder", "Inferer", "Trainer"]
