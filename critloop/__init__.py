"""critloop: self-correcting LLM math reasoning (policy -> GenPRM critic -> refiner, in LangGraph).

Embed the loop in three lines::

    from critloop import Solver
    result = Solver.from_config().solve("What is 2 + 3 * 4?")
    print(result.answer, result.stop_reason)
"""

from critloop.agent import CriticConfig, CritiqueReport, GenPRMCritic
from critloop.agent.policy import Policy, RefineMode, Refiner
from critloop.agent.steps import extract_answer, join_steps, split_steps
from critloop.agent.writer import ChatModelWriter, CompletionWriter, Writer
from critloop.config import CritloopConfig, load_config
from critloop.errors import CritloopError
from critloop.graphs.budget import Budget, StopReason, Usage
from critloop.sandbox import ExecResult, SandboxConfig, SandboxPool, Session
from critloop.solver import Solver, SolveResult
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
    "Budget",
    "ChatModelWriter",
    "CompletionWriter",
    "Policy",
    "Refiner",
    "RefineMode",
    "SolveResult",
    "Solver",
    "StopReason",
    "Usage",
    "Writer",
    "extract_answer",
    "join_steps",
    "split_steps",
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
