"""Writers for maps and reconstructions that line up with the input in 3D Slicer."""

from volad.export.nifti import write_like, write_nifti

__all__ = ["write_like", "write_nifti"]
