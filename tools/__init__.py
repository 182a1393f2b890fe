"""Tools the roles use: model clients (later), the Python-sandbox LangChain tool, grading (later)."""

from critloop.tools.python_sandbox import PythonSandboxTool

__all__ = ["PythonSandboxTool"]
