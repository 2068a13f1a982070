"""volad: 3D-first unsupervised anomaly detection in brain MRI, built on MONAI."""

__version__ = "0.1.0"
