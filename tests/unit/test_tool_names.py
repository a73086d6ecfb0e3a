"""How tools are named in code (what the clients expect): the normalisation table and its collisions."""

from __future__ import annotations

import pytest

from interpreter.api.programmatic import ToolSpec, bind_name, tools_of
from interpreter.errors import BadRequest


@pytest.mark.parametrize(
    ("name", "lang", "bound"),
    [
        ("get_weather", "py", "get_weather"),
        ("get-weather", "py", "get_weather"),
        ("get weather\tnow", "py", "get_weather_now"),
        ("web.search", "py", "websearch"),
        ("web.search", "bash", "web_search"),
        ("3d-render", "py", "_3d_render"),
        ("class", "py", "class_tool"),
        ("None", "py", "None_tool"),
        ("done", "bash", "done_tool"),
        ("class", "bash", "class"),
        ("émoji☃", "py", "moji"),
        ("☃", "py", "_unnamed"),
        ("", "bash", "_unnamed"),
    ],
)
def test_bound_names(name: str, lang: str, bound: str) -> None:
    assert bind_name(name, lang) == bound


def test_tools_keep_their_client_names_and_a_repeat_is_one_tool() -> None:
    tools = tools_of([ToolSpec(name="a-b", description="d"), ToolSpec(name="a-b")], "py")
    assert [(tool.name, tool.bind, tool.description) for tool in tools] == [("a-b", "a_b", "d")]


def test_two_tools_with_one_bound_name_are_refused() -> None:
    with pytest.raises(BadRequest, match="would both be called a_b"):
        tools_of([ToolSpec(name="a-b"), ToolSpec(name="a b")], "py")
