"""Bounds on run settings that fail at config time instead of hanging or exhausting memory
after training: tokens beyond any context a T5 or BART model is used with here, beams beyond
any search a summarisation paper runs."""

MAX_TOKENS = 16_384
MAX_BEAMS = 64
