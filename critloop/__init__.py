"""critloop: self-correcting LLM math reasoning (policy -> GenPRM critic -> refiner, in LangGraph).

The public API grows issue by issue; today: the code sandbox and its LangChain tool, the model
layer, and the GenPRM critic.
"""

from critloop.agent import CriticConfig, CritiqueReport, GenPRMCritic
from critloop.config import CritloopConfig, load_config
from critloop.errors import CritloopError
from critloop.sandbox import ExecResult, SandboxConfig, SandboxPool, Session
from critloop.tools import (
    CompletionModel,
    EndpointConfig,
    OpenAICompletionModel,
    PythonSandboxTool,
    SamplingParams,
    TransformersEngine,
)

__version__ = "0.1.0"

__all__ = [
    "CompletionModel",
    "CriticConfig",
    "CritiqueReport",
    "CritloopConfig",
    "CritloopError",
    "EndpointConfig",
    "GenPRMCritic",
    "OpenAICompletionModel",
    "SamplingParams",
    "TransformersEngine",
    "load_config",
    "ExecResult",
    "PythonSandboxTool",
    "SandboxConfig",
    "SandboxPool",
    "Session",
    "__version__",
]
