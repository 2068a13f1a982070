"""Studies made of whole bundle runs (anomalib's ``pipelines``): ``volad bench`` (quality, cost, budget),
``volad protocol`` and ``volad tune``."""
