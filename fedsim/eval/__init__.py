"""Evaluation: one teacher-forced pass per batch (:mod:`~fedsim.eval.scoring`) whose outputs each metric sums on the
workers (:mod:`~fedsim.eval.metrics`, the metric extension point), the sums reduced in the driver; per-client
personalized evaluation tables (:mod:`~fedsim.eval.personal`); FedDPA-D's prompt embeddings
(:mod:`~fedsim.eval.embeddings`)."""
