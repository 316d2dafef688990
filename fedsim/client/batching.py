"""Collate tokenized samples into padded tensors (the causal-LM rows; a model task collates its own with
:meth:`fedsim.models.tasks.ModelTask.collate`)."""

from fedsim.models.batches import IGNORE, collate  # noqa: F401  # re-exported
