"""evomerge: evolutionary search for model-merging recipes."""

__version__ = "0.1.0"
