"""Data: loading and formatting (datasets.py), non-IID partitioners (partition.py), built-in tasks (synthetic.py)."""
