"""The agents' MCP tool server as a real process, listed and called through the official client; failures recorded."""

import pytest

from framework.agents import LocalTools, MessageLog, ScriptedBackend, ToolClient, Topology, run
from framework.agents import log as log_lib
from framework.tasks.arithmetic import Problem

P0 = Problem(23, ("+", "*", "-", "*"), (45, 3, 17, 2))
P1 = Problem(10, ("+",), (5,))


@pytest.fixture(scope="module")
def client():
    with ToolClient() as c:
        yield c
    assert not c._thread.is_alive()  # the session, the server process and the loop are gone


def test_server_lists_both_tools_with_schemas(client):
    tools = client.list_tools()
    assert sorted(tools) == ["calculator", "lookup"]
    assert tools["calculator"]["required"] == ["a", "op", "b"]
    assert tools["lookup"]["properties"]["key"]["type"] == "string"


def test_calls_come_back_in_order_and_match_the_local_tools(client):
    calls = [("calculator", {"a": a, "op": op, "b": b}) for a, op, b in [(23, "*", 45), (4, "-", 17), (99, "+", 1)]]
    calls.append(("lookup", {"key": "modulus"}))
    got = client.call_batch(calls)
    assert [r.value for r in got] == [35, 87, 0, "100"] and all(r.error is None for r in got)
    assert got == LocalTools().call_batch(calls)


def test_schema_invalid_and_failing_calls_are_recorded_not_raised(client):
    got = client.call_batch(
        [
            ("calculator", {"a": "x", "op": "*", "b": 1}),  # a is not an integer
            ("calculator", {"a": 1, "op": "/", "b": 1}),  # op outside the enum
            ("calculator", {"a": 1, "op": "+"}),  # b missing
            ("lookup", {"key": "nope"}),  # valid arguments, the tool fails
            ("search", {"q": "x"}),  # no such tool
        ]
    )
    assert all(r.value is None for r in got)
    assert "JSON schema" in got[0].error and "JSON schema" in got[1].error and "JSON schema" in got[2].error
    assert "no key 'nope'" in got[3].error and "unknown tool" in got[4].error


def test_the_server_itself_rejects_schema_invalid_arguments():
    with ToolClient(check_schema=False) as raw:
        (bad,) = raw.call_batch([("calculator", {"a": "x", "op": "*", "b": 1})])
    assert bad.value is None and "validation error" in bad.error


def test_a_tool_using_topology_through_the_real_client(client):
    def sloppy(phase, r):  # right ops and operands, every result wrong
        return "23+45=00\n00*03=00\n00-17=00\n00*02=00\nA 00\n" if r.task == 0 else "10+05=99\nA 99\n"

    log = MessageLog(None)
    before = client.calls
    res = run(Topology("single", tools=True), [P0, P1], ScriptedBackend(sloppy), tools=client, log=log)
    assert res.answers == [74, 15] and client.calls - before == 5
    tool_msgs = [log_lib.message_data(m) for m in log.messages() if "tool" in log_lib.message_data(m)]
    assert [m["result"] for m in tool_msgs] == [68, 15, 4, 87, 74]
    assert [m["phase"] for m in tool_msgs] == ["solve/tool0"] * 2 + ["solve/tool1", "solve/tool2", "solve/tool3"]
