"""The run folder's record: checkpoints (:mod:`~volad.runs.checkpoint`: written atomically, read safely) and what a
run recorded about its method, data and settings (:mod:`~volad.runs.record`)."""
