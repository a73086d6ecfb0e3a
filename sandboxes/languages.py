"""Languages as data: ``languages/<code>.toml`` validated into ``LanguageSpec`` at start.

A spec says which file the source goes to and which shell command compiles and runs it inside
the jail. The command runs as ``/bin/sh -c COMMAND sh ARGS...``, so ``"$@"`` hands the request's
``args`` to the program without any shell quoting of ours. Placeholders: ``{source}`` (the source
file name), ``{main}`` (Java's class), ``{heap_mib}`` (a heap cap below the memory limit), ``{venv}``.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

CODE = re.compile(r"^[a-z0-9]{1,8}$")


class Runtime(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    binary: str
    version: list[str]


class LanguageSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    code: str
    name: str
    source: str = Field(description="file name in /mnt/data; {main} for Java")
    command: str = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    timeout_multiplier: float = Field(1.0, ge=1.0, le=10.0)
    memory_multiplier: float = Field(1.0, ge=1.0, le=8.0)
    pids: int = Field(64, ge=8, le=4096)
    source_naming: Literal["fixed", "java_class"] = "fixed"
    smoke: str = Field(description="smoke program file beside the spec")
    smoke_expect: str
    runtime: Runtime

    @field_validator("source")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if "/" in value or value.startswith("."):
            raise ValueError("must be a plain file name")
        return value


class LanguageError(Exception):
    """A language file is invalid: the server refuses to start."""


def load_languages(directory: Path) -> dict[str, LanguageSpec]:
    """Every ``<code>.toml`` in ``directory``, keyed by code.

    Raises:
        LanguageError: a file does not parse or validate, or its smoke program is missing.
    """
    languages: dict[str, LanguageSpec] = {}
    for path in sorted(directory.glob("*.toml")):
        code = path.stem
        if not CODE.match(code):
            raise LanguageError(f"{path.name}: language codes are 1-8 lowercase letters or digits")
        try:
            spec = LanguageSpec.model_validate({"code": code, **tomllib.loads(path.read_text())})
        except (tomllib.TOMLDecodeError, ValidationError) as exc:
            raise LanguageError(f"{path.name}: {exc}") from None
        if not (directory / spec.smoke).is_file():
            raise LanguageError(f"{path.name}: smoke program {spec.smoke} is missing")
        languages[code] = spec
    if not languages:
        raise LanguageError(f"no language files in {directory}")
    return languages


_JAVA_TOKEN = re.compile(
    r"[{}]|(?P<decl>\b(?P<mods>(?:(?:public|final|abstract|strictfp|sealed|non-sealed)\s+)*)"
    r"(?:class|record|enum|interface)\s+(?P<name>[A-Za-z_$][\w$]*))"
)
_JAVA_NOISE = re.compile(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'", re.S)
_JAVA_PACKAGE = re.compile(r"^\s*package\s+([A-Za-z_$][\w$.]*)\s*;", re.M)
_JAVA_MAIN = re.compile(r"\bstatic\s+(?:final\s+)?void\s+main\s*\(")


def _top_level_types(text: str) -> list[tuple[str, bool, bool]]:
    """(name, is public, declares main) of each type declared outside any braces. One linear pass."""
    types: list[tuple[str, bool, bool]] = []
    depth = 0
    current: tuple[str, bool] | None = None  # the top-level type whose body we are in
    body_start = 0
    for token in _JAVA_TOKEN.finditer(text):
        if token.group("decl") and depth == 0:
            current, body_start = (token.group("name"), "public" in token.group("mods").split()), token.end()
        elif token.group(0) == "{":
            depth += 1
        elif token.group(0) == "}":
            depth = max(0, depth - 1)
            if depth == 0 and current is not None:
                types.append((*current, bool(_JAVA_MAIN.search(text, body_start, token.start()))))
                current = None
    if current is not None:  # an unterminated body: still a declaration
        types.append((*current, bool(_JAVA_MAIN.search(text, body_start))))
    return types


MAX_JAVA_STEM_BYTES = 200  # + ".java" stays well inside NAME_MAX (255)


def java_main_class(code: str) -> tuple[str, str]:
    """(file stem, class to run): the public top-level type, else the one declaring main, else the first one.

    javac wants a public type in a file of its name; ``java`` wants the class with ``main``, with its
    package. Comments and string literals are ignored.
    """
    text = _JAVA_NOISE.sub(" ", code)
    types = _top_level_types(text)
    public = next((name for name, is_public, _ in types if is_public), None)
    with_main = next((name for name, _, has_main in types if has_main), None)
    stem = public or with_main or (types[0][0] if types else "Main")
    if len(stem.encode()) > MAX_JAVA_STEM_BYTES:
        # Not a name the host can create a file by: javac then reports the mismatch, a compile error.
        stem = "Main"
    runnable = with_main or stem
    package = _JAVA_PACKAGE.search(text)
    return stem, f"{package.group(1)}.{runnable}" if package else runnable


def source_name(spec: LanguageSpec, code: str) -> tuple[str, str]:
    """(file name, main class) for this program."""
    if spec.source_naming == "java_class":
        stem, main = java_main_class(code)
        return spec.source.format(main=stem), main
    return spec.source, ""
