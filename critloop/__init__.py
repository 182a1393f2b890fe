"""critloop: self-correcting LLM math reasoning (policy -> GenPRM critic -> refiner, in LangGraph).

Embed the loop in three lines::

    from critloop import Solver
    result = Solver.from_config().solve("What is 2 + 3 * 4?")
    print(result.answer, result.stop_reason)
"""

from critloop.agent import CriticConfig, CritiqueReport, GenPRMCritic
from critloop.agent.budget import Budget, StopReason, Usage, UsageMeter
from critloop.agent.policy import Policy, RefineMode, Refiner
from critloop.agent.steps import extract_answer, join_steps, split_steps
from critloop.agent.writer import ChatModelWriter, CompletionWriter, Writer
from critloop.config import CritloopConfig, load_config
from critloop.errors import BudgetExceededError, CritloopError
from critloop.graphs.events import (
    DoneEvent,
    RefinedEvent,
    RefiningEvent,
    RunEvent,
    SolutionEvent,
    StepEvent,
)
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
    # the loop
    "Solver",
    "SolveResult",
    "StopReason",
    "Budget",
    "Usage",
    "UsageMeter",
    # its events, in the order a run yields them
    "SolutionEvent",
    "StepEvent",
    "RefiningEvent",
    "RefinedEvent",
    "DoneEvent",
    "RunEvent",
    # roles
    "Policy",
    "Refiner",
    "RefineMode",
    "Writer",
    "ChatModelWriter",
    "CompletionWriter",
    "GenPRMCritic",
    "CriticConfig",
    "CritiqueReport",
    # models
    "CompletionModel",
    "EndpointConfig",
    "OpenAICompletionModel",
    "SamplingParams",
    "TransformersEngine",
    # sandbox
    "ExecResult",
    "PythonSandboxTool",
    "SandboxConfig",
    "SandboxPool",
    "Session",
    # configuration, errors, steps
    "CritloopConfig",
    "load_config",
    "CritloopError",
    "BudgetExceededError",
    "extract_answer",
    "join_steps",
    "split_steps",
    "__version__",
]
