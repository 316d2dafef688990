"""The update pipeline: what happens to a client's update between its local training and the new global state.

- Client side, :class:`UpdateTransform` (:mod:`fedsim.pipeline.transforms`): each transform maps the tensors a client
  uploads to new ones, after local training, on the worker (today: the injected NaN fault; next: clipping, local
  noise, attacks).
- Server side, :class:`ServerStage` (:mod:`fedsim.pipeline.stages`): stages run around ``Strategy.aggregate`` — before
  it on the round's updates (validation today; robust filters next), after it on the new state (central noise, server
  optimizers next) — and keep state that checkpoints.

Both are pure tensor code, like strategies: no Ray, no files, no logging.
"""

from fedsim.pipeline.server_opt import OPTIMIZERS, ServerOptimizer
from fedsim.pipeline.stages import ServerStage, StageResult, ValidateUpdates
from fedsim.pipeline.transforms import NanFault, TransformContext, UpdateTransform, fault_draws

__all__ = ["OPTIMIZERS", "NanFault", "ServerOptimizer", "ServerStage", "StageResult", "TransformContext", "UpdateTransform", "ValidateUpdates",
           "fault_draws"]
