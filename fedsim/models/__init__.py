"""Base models (base.py) and PEFT adapters (adapters.py)."""
