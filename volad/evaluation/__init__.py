"""Method-agnostic evaluation: post-processing, thresholds, voxel metrics, reports."""
