"""critloop: self-correcting LLM math reasoning (policy -> GenPRM critic -> refiner, in LangGraph).

The public API grows issue by issue; today it is the code sandbox and its LangChain tool.
"""

from critloop.errors import CritloopError
from critloop.sandbox import ExecResult, SandboxConfig, SandboxPool, Session
from critloop.tools import PythonSandboxTool

__version__ = "0.1.0"

__all__ = [
    "CritloopError",
    "ExecResult",
    "PythonSandboxTool",
    "SandboxConfig",
    "SandboxPool",
    "Session",
    "__version__",
]
