"""Serving SkillPacks: the embedded continuous-batching engine, and the OpenAI-compatible server around it."""

from .engine import ErrorEvent, FinishEvent, GenerationEngine, GenerationHandle, SamplingParams, TokenEvent
from .launch import ChildServer, ServerProcess, free_port

__all__ = [
    "ChildServer",
    "ErrorEvent",
    "FinishEvent",
    "GenerationEngine",
    "GenerationHandle",
    "SamplingParams",
    "ServerProcess",
    "TokenEvent",
    "free_port",
]
