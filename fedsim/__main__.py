"""``python -m fedsim ...``: the ``fedsim`` command without relying on PATH (e.g. as a Ray job's entrypoint)."""

from fedsim.cli import entry

if __name__ == "__main__":
    entry()
