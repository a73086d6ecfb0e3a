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


_JAVA_PUBLIC = re.compile(
    r"\bpublic\s+(?:(?:final|abstract|strictfp)\s+)*(?:class|record|enum|interface)\s+([A-Za-z_$][\w$]*)"
)
_JAVA_ANY = re.compile(r"\b(?:class|record|enum|interface)\s+([A-Za-z_$][\w$]*)")
_JAVA_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\])*\"", re.S)


def java_main_class(code: str) -> str:
    """The class javac needs the file named after: the public top-level type, else the first type, else Main."""
    text = _JAVA_COMMENTS.sub(" ", code)
    match = _JAVA_PUBLIC.search(text) or _JAVA_ANY.search(text)
    return match.group(1) if match else "Main"


def source_name(spec: LanguageSpec, code: str) -> tuple[str, str]:
    """(file name, main class) for this program."""
    if spec.source_naming == "java_class":
        main = java_main_class(code)
        return spec.source.format(main=main), main
    return spec.source, ""
