"""Agents: the parts of multi-turn episodes that do not depend on the trainer.

tools.py (Python functions as tools, their JSON schemas, argument checks), calls.py (the tool-call format:
parsing calls from the model's text, the instructions for templates without tool support, tool messages),
runner.py (running a batch's calls in threads with a deadline; every failure an observation),
builtin_tools.py (calculator, python), sandbox.py (the python tool's separate, limited process),
environments.py (the reset/step environment contract and its checked wrapper) and episode.py (an episode as
token ids: the sampled ids kept, only what follows a turn encoded). docs/agents.md describes them.
"""
