"""Serving SkillPacks: the embedded continuous-batching engine, and the OpenAI-compatible server around it."""

from .engine import ErrorEvent, FinishEvent, GenerationEngine, GenerationHandle, SamplingParams, TokenEvent
from .launch import ServerProcess

__all__ = [
    "ErrorEvent",
    "FinishEvent",
    "GenerationEngine",
    "GenerationHandle",
    "SamplingParams",
    "ServerProcess",
    "TokenEvent",
]
