"""Tools the roles use: completion models (HTTP, a router over replicas, in-process), the
embedded model, chat templates, and the Python-sandbox LangChain tool. Grading comes with the
batch runner."""

from critloop.tools.chat_template import ChatMessage, ChatTemplate, load_tokenizer
from critloop.tools.completion import (
    Completion,
    CompletionModel,
    CompletionResult,
    FinishReason,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)
from critloop.tools.embedded import DEFAULT_EMBEDDED_MODEL, CachedModel, fetch_model, list_models
from critloop.tools.endpoint import (
    EndpointConfig,
    EndpointKind,
    build_completion_model,
    build_completion_models,
)
from critloop.tools.local_engine import TransformersEngine
from critloop.tools.openai_client import OpenAICompletionModel
from critloop.tools.python_sandbox import PythonSandboxTool
from critloop.tools.replicas import ReplicaRouter, ReplicaStatus, Routing

__all__ = [
    "DEFAULT_EMBEDDED_MODEL",
    "CachedModel",
    "ChatMessage",
    "ChatTemplate",
    "Completion",
    "CompletionModel",
    "CompletionResult",
    "EndpointConfig",
    "EndpointKind",
    "FinishReason",
    "OpenAICompletionModel",
    "PythonSandboxTool",
    "ReplicaRouter",
    "ReplicaStatus",
    "Routing",
    "SamplingParams",
    "TokenLogprob",
    "TopLogprob",
    "TransformersEngine",
    "build_completion_model",
    "build_completion_models",
    "fetch_model",
    "list_models",
    "load_tokenizer",
]
