"""3D Slicer export (:mod:`volad.export.slicer`); the NIfTI writers live in :mod:`volad.io` beside the readers."""

from volad.io import write_like, write_nifti

__all__ = ["write_like", "write_nifti"]
