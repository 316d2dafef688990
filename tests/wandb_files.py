"""Read W&B offline run files back (the reader lives in :mod:`fedsim.wandb_files`; resume uses it too)."""

from fedsim.wandb_files import durable_step, history, of_type, records, run_files  # noqa: F401
