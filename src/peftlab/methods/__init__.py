"""Method registry: a method is added with one module (defining METHOD) and one line here."""

from __future__ import annotations

from peftlab.errors import unknown_name
from peftlab.methods import full, ia3, ln, lora, peft_any, prefix, prompt, untuned
from peftlab.methods.base import Baseline, Method, MethodContext
from peftlab.methods.baselines import LEAD3, MAJORITY

METHODS: dict[str, Method | Baseline] = {
    m.name: m
    for m in (
        full.METHOD, lora.METHOD, prompt.METHOD, prefix.METHOD, ia3.METHOD, ln.METHOD,
        peft_any.METHOD, untuned.METHOD, MAJORITY, LEAD3,
    )
}


def get_method(name: str) -> Method | Baseline:
    if name not in METHODS:
        raise unknown_name("method", name, METHODS)
    return METHODS[name]


__all__ = ["Baseline", "METHODS", "Method", "MethodContext", "get_method"]
