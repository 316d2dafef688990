"""The update pipeline: what happens to a client's update between its local training and the new global state.

- Client side, :class:`UpdateTransform` (:mod:`fedsim.pipeline.transforms`): each transform maps the tensors a client
  uploads to new ones, after local training, on the worker — the injected NaN fault, local differential privacy
  (:mod:`fedsim.pipeline.privacy`), attacks, compression (:mod:`fedsim.pipeline.compression`: last, with the bytes on
  the wire and per-client error-feedback state).
- Server side, :class:`ServerStage` (:mod:`fedsim.pipeline.stages`): stages run around ``Strategy.aggregate`` — before
  it on the round's updates (validation, robust rules, central privacy's clipping, FedBuff's staleness weighting:
  :mod:`fedsim.pipeline.asynchronous`), after it on the new state (central noise, server optimizers) — configure the
  payloads (SCAFFOLD's variate, a compressed broadcast), and keep state that checkpoints.

Both are pure tensor code, like strategies: no Ray, no files, no logging.
"""

from fedsim.pipeline.server_opt import OPTIMIZERS, ServerOptimizer
from fedsim.pipeline.stages import ServerStage, StageResult, ValidateUpdates
from fedsim.pipeline.transforms import NanFault, TransformContext, UpdateTransform, fault_draws

__all__ = ["OPTIMIZERS", "NanFault", "ServerOptimizer", "ServerStage", "StageResult", "TransformContext", "UpdateTransform", "ValidateUpdates",
           "fault_draws"]
