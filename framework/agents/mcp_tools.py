"""The agents' MCP tool server (stdio): a modular calculator and a key-value lookup, built on the official `mcp` SDK.

Run it as a process (what `framework.agents.tools.ToolClient` does):

    python -m framework.agents.mcp_tools [--table path.json]

Tools (their JSON input schemas come from the signatures; the SDK rejects arguments that do not validate):
  calculator(a, op, b, modulus=100) -> (a op b) mod modulus, with op one of "+", "-", "*", 0 <= a, b < modulus.
  lookup(key) -> the string stored under `key` in the table (`--table`, a JSON object of strings; default
  `DEFAULT_TABLE`), an error for a key it does not hold.
"""

from __future__ import annotations

import argparse
import json
from typing import Annotated, Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from framework.agents.tools import DEFAULT_TABLE, calculate


def build_server(table: dict[str, str] | None = None) -> MCPServer:
    """The MCP server with the calculator and lookup tools over `table`."""
    table = dict(DEFAULT_TABLE if table is None else table)
    server = MCPServer("lumen-agent-tools", log_level="ERROR")

    @server.tool()
    def calculator(
        a: Annotated[int, Field(ge=0)],
        op: Literal["+", "-", "*"],
        b: Annotated[int, Field(ge=0)],
        modulus: Annotated[int, Field(ge=2)] = 100,
    ) -> int:
        """One step of a modular-arithmetic chain: (a op b) mod modulus."""
        if a >= modulus or b >= modulus:
            raise ToolError(f"operands must lie in [0, {modulus}), got a = {a}, b = {b}")
        return calculate(a, op, b, modulus)

    @server.tool()
    def lookup(key: Annotated[str, Field(min_length=1)]) -> str:
        """The value stored under `key` in the server's table."""
        if key not in table:
            raise ToolError(f"lookup: no key {key!r}; the table holds {sorted(table)}")
        return table[key]

    return server


def main(argv=None) -> None:
    """Serves the tools on stdin/stdout until the client closes the pipe."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", default=None, help="JSON file: an object of string values for `lookup`")
    args = parser.parse_args(argv)
    table = None
    if args.table:
        with open(args.table) as f:
            table = json.load(f)
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise SystemExit(f"--table {args.table}: expected a JSON object of strings")
    build_server(table).run("stdio")


if __name__ == "__main__":
    main()
