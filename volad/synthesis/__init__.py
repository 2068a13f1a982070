"""Synthetic noise and anomalies used for training (noise-based denoisers, synthetic-anomaly detectors)."""
