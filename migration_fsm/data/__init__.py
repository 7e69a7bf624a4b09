"""Data tools: the task record, the store protocol and its adapters."""
