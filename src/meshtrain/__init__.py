"""meshtrain: every parallelism for training transformer LMs, in one readable, tested codebase."""

__version__ = "0.1.0"
