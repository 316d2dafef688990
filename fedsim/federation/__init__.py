"""The federation's side of a run, above the runtime: preparation (:mod:`~fedsim.federation.prepare`), the round's
stages (:mod:`~fedsim.federation.rounds`), the simulated clock (:mod:`~fedsim.federation.clock`), the failure
policy (:mod:`~fedsim.federation.failures`), evaluation (:mod:`~fedsim.federation.evaluation`), the round's row
(:mod:`~fedsim.federation.rows`), callbacks (:mod:`~fedsim.federation.callbacks`) and the run directory
(:mod:`~fedsim.federation.rundir`). It sees the backend only through its interfaces: handles, never tensors."""
