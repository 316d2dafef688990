"""The Ray backend: the worker pool (:mod:`~fedsim.runtime.ray.pool`), its actors (:mod:`~fedsim.runtime.ray.actors`,
:mod:`~fedsim.runtime.ray.remote_worker`), the server behind the object store (:mod:`~fedsim.runtime.ray.server_host`),
the dispatch of a round's jobs with its retry policy (:mod:`~fedsim.runtime.ray.dispatch`) and the backend itself
(:mod:`~fedsim.runtime.ray.backend`)."""
