"""peftlab: which way of adapting a small seq2seq model wins, at what cost, with how little data."""

__version__ = "0.1.0"


def __getattr__(name: str):  # the Python API, imported on first use (torch loads with it)
    if name in __all__:
        import importlib

        return getattr(importlib.import_module("peftlab.api"), name)
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")


__all__ = ["Run", "Study", "export", "load_adapter", "load_run", "load_study", "run_study",
           "train"]
