"""peftlab: which way of adapting a small seq2seq model wins, at what cost, with how little data."""

__version__ = "0.1.0"
