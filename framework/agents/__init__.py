"""Multi-agent systems of Lumen LMs on the arithmetic chains: topologies, batched rounds, an A2A-shaped log, MCP tools.

from framework.agents import Agent, LMBackend, Topology, run
backend = LMBackend([Agent(params, cfg, Sampling(temperature=0.7))] * 3, seed=0)
result = run(Topology("debate", agents=3, rounds=2), problems, backend, log=MessageLog("runs/x/log.jsonl"))
result.accuracy, result.flops_per_solved, result.failures, result.changes
backend.calls        # one generate per phase: ["solve", "revise1", "revise2"]

Modules: `formats` (role prompts, parsers, planted errors, role training data), `backend` (agents, LM and scripted
backends), `runner` (phases, log, tools, costs), `topologies` (single, vote, debate, centralised, hybrid,
pipeline), `log` (A2A-shaped message log), `tools` / `mcp_tools` (the MCP client and server).
"""

import importlib

# Names load lazily: the MCP server process (`python -m framework.agents.mcp_tools`) imports this package without
# pulling in JAX.
_HOMES = {
    "Agent": "backend",
    "LMBackend": "backend",
    "Reply": "backend",
    "Request": "backend",
    "Sampling": "backend",
    "ScriptedBackend": "backend",
    "MessageLog": "log",
    "Runner": "runner",
    "RunResult": "runner",
    "KINDS": "topologies",
    "Topology": "topologies",
    "majority": "topologies",
    "plant_points": "topologies",
    "run": "topologies",
    "LocalTools": "tools",
    "ToolClient": "tools",
    "ToolResult": "tools",
}


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'framework.agents' has no attribute {name!r}")
    return getattr(importlib.import_module(f"framework.agents.{_HOMES[name]}"), name)


__all__ = [
    "KINDS",
    "Agent",
    "LMBackend",
    "LocalTools",
    "MessageLog",
    "Reply",
    "Request",
    "RunResult",
    "Runner",
    "Sampling",
    "ScriptedBackend",
    "ToolClient",
    "ToolResult",
    "Topology",
    "majority",
    "plant_points",
    "run",
]
