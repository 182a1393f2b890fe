"""The LangGraph state, the refine graph and the batch and evaluation runners."""
