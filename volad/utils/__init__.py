"""Small jobs every layer may need: processes (:mod:`~volad.utils.distributed`), progress bars, help formatting and
command-line values, the run-folder lock (:mod:`~volad.utils.rundir`) and seeds (:mod:`~volad.utils.seed`)."""
