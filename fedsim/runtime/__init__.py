"""Where the work runs: the backend interface (:mod:`~fedsim.runtime.interfaces`), the in-process backend
(:mod:`~fedsim.runtime.local`), the Ray backend (:mod:`fedsim.runtime.ray`), and the worker that trains clients on a
cached base model (:mod:`~fedsim.runtime.worker`). The only layer that touches Ray, devices and processes."""
