"""MuxTune: many tenants' PEFT jobs multiplexed on one shared frozen LLM backbone."""

__version__ = "0.1.0"
