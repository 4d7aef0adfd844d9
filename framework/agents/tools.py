"""Tool clients for agents: the MCP stdio client (a real server process) and an in-process stand-in for tests.

    with ToolClient() as tools:                       # starts `python -m framework.agents.mcp_tools`
        tools.list_tools()                            # {"calculator": input JSON schema, "lookup": ...}
        tools.call_batch([("calculator", {"a": 23, "op": "*", "b": 45}), ("lookup", {"key": "modulus"})])
        # -> [ToolResult(value=35, error=None), ToolResult(value="100", error=None)]

`call_batch` sends every call of a batch concurrently over the one session (asyncio.gather) and returns results
in order. Arguments are checked against the tool's listed JSON schema before sending; a call that fails that
check, names an unknown tool or that the server reports as an error comes back as a `ToolResult` with `error`
set, never as an exception. The client runs its event loop on a background thread so synchronous code (the runner)
can call it; `close()` (or leaving the `with`) ends the session and stops the server process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
from collections.abc import Sequence
from typing import Any

import jsonschema

from framework.tasks import arithmetic  # numpy only: the MCP server process stays free of JAX

DEFAULT_TABLE = {"modulus": "100", "width": "2", "ops": "+-*"}


def calculate(a: int, op: str, b: int, modulus: int = 100) -> int:
    """(a op b) mod modulus: the arithmetic task's step, as the calculator tool computes it."""
    return arithmetic.apply_op(a, op, b, modulus)


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """A tool's result value, or `error` (a message) when the call failed."""

    value: Any = None
    error: str | None = None


def _check_args(schemas: dict[str, dict], name: str, args: Any) -> str | None:
    if name not in schemas:
        return f"unknown tool {name!r}; the server lists {sorted(schemas)}"
    try:
        jsonschema.validate(args, schemas[name])
    except jsonschema.ValidationError as e:
        return f"tool {name}: arguments {args!r} fail its JSON schema: {e.message}"
    return None


class ToolClient:
    """An MCP client session to the agents' tool server, started as a subprocess over stdio."""

    def __init__(self, command: Sequence[str] | None = None, *, timeout_s: float = 60.0, check_schema: bool = True):
        self.command = list(command or [sys.executable, "-m", "framework.agents.mcp_tools"])
        self.check_schema = check_schema  # False sends arguments unchecked (the server then rejects bad ones)
        self.timeout_s = timeout_s
        self.calls = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._ready = threading.Event()
        self._session = None
        self._error: BaseException | None = None
        self._closing: asyncio.Event | None = None
        self._main = asyncio.run_coroutine_threadsafe(self._serve(), self._loop)
        if not self._ready.wait(timeout_s) or self._error is not None:
            self.close()
            raise RuntimeError(f"MCP tool server {self.command} did not start: {self._error!r}")
        self.schemas = self._run(self._list())

    async def _serve(self):
        from mcp import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client

        self._closing = asyncio.Event()
        try:
            params = StdioServerParameters(command=self.command[0], args=self.command[1:])
            async with stdio_client(params) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    self._session = session
                    self._ready.set()
                    await self._closing.wait()
        except BaseException as e:  # surfaced to the constructor
            self._error = e
            self._ready.set()

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout_s)

    async def _list(self) -> dict[str, dict]:
        listed = await self._session.list_tools()
        return {t.name: t.input_schema for t in listed.tools}

    def list_tools(self) -> dict[str, dict]:
        """Tool name -> its JSON input schema, as the server lists them."""
        return dict(self.schemas)

    async def _call(self, name: str, args: dict) -> ToolResult:
        bad = _check_args(self.schemas, name, args) if self.check_schema else None
        if bad is not None:
            return ToolResult(error=bad)
        try:
            res = await self._session.call_tool(name, args)
        except Exception as e:  # a transport or protocol error is this call's failure, not the run's
            return ToolResult(error=f"tool {name}: {type(e).__name__}: {e}")
        text = " ".join(getattr(c, "text", "") for c in res.content)
        if res.is_error:
            return ToolResult(error=f"tool {name}: {text}")
        value = (res.structured_content or {}).get("result", text)
        return ToolResult(value=value)

    def call_batch(self, calls: Sequence[tuple[str, dict]]) -> list[ToolResult]:
        """Calls every (tool, arguments) concurrently over the session; one `ToolResult` per call, in order."""
        self.calls += len(calls)

        async def gather():
            return await asyncio.gather(*(self._call(n, a) for n, a in calls))

        return list(self._run(gather())) if calls else []

    def close(self) -> None:
        """Ends the session and the server process, then the event loop."""
        if self._closing is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._closing.set)
            try:
                self._main.result(self.timeout_s)
            except Exception:
                pass
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self.timeout_s)
        self._closing = None

    def __enter__(self) -> ToolClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalTools:
    """The same tools and schema checks in-process (no MCP): for scripted tests and replays without a server."""

    SCHEMAS = {
        "calculator": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0},
                "op": {"enum": ["+", "-", "*"], "type": "string"},
                "b": {"type": "integer", "minimum": 0},
                "modulus": {"type": "integer", "minimum": 2, "default": 100},
            },
            "required": ["a", "op", "b"],
        },
        "lookup": {"type": "object", "properties": {"key": {"type": "string", "minLength": 1}}, "required": ["key"]},
    }

    def __init__(self, table: dict[str, str] | None = None):
        self.table = dict(DEFAULT_TABLE if table is None else table)
        self.calls = 0
        self.batches = 0

    def list_tools(self) -> dict[str, dict]:
        """Tool name -> JSON input schema."""
        return dict(self.SCHEMAS)

    def call_batch(self, calls: Sequence[tuple[str, dict]]) -> list[ToolResult]:
        """Runs each call in order; failures come back as `ToolResult.error`."""
        self.calls += len(calls)
        self.batches += 1
        out = []
        for name, args in calls:
            bad = _check_args(self.SCHEMAS, name, args)
            if bad is not None:
                out.append(ToolResult(error=bad))
            elif name == "calculator":
                m = args.get("modulus", 100)
                if args["a"] >= m or args["b"] >= m:
                    out.append(ToolResult(error=f"tool calculator: operands must lie in [0, {m})"))
                else:
                    out.append(ToolResult(value=calculate(args["a"], args["op"], args["b"], m)))
            else:
                key = args["key"]
                out.append(ToolResult(value=self.table[key]) if key in self.table else ToolResult(error=f"no {key!r}"))
        return out
