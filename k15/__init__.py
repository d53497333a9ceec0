"""k15: asynchronous RL for long chain-of-thought LLMs (Kimi k1.5 style) on Ray."""
__version__ = "0.1.0"
