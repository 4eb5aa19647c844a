"""What is wrong with a configuration, said in one line each.

:class:`ConfigError` is what ``detour`` refuses to start with; its message names where each
problem was given: ``detour.yaml:7: cache.max_size: ...`` for a key of the YAML file,
``environment DETOUR_CACHE__MAX_SIZE: ...`` for a variable, with a did-you-mean for a name
that sets nothing. pydantic's and PyYAML's errors are turned into those lines here, so that
:mod:`proxy.settings` says only what the settings are. The functions take the settings model
as an argument and never import it: :mod:`proxy.settings` imports this module, not the other
way round.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_settings import SettingsError

# Settings' env_prefix: every variable named in a message starts with it.
ENV_PREFIX = "DETOUR_"

KeyLines = dict[tuple[str | int, ...], int]


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file, line and key of each
    problem, one line each (``detour.yaml:7: cache.max_size: ...``)."""


def key_lines(path: Path) -> KeyLines:
    """Each key's line in the YAML file, by its path; refuses a file that is not YAML, or
    whose top level is not a mapping, with the line of the problem."""
    try:
        text = path.read_text()
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"{mark.line + 1}:" if mark is not None else ""
        problem = exc.problem or exc.context or "not valid YAML"
        hint = " (YAML is indented with spaces, not tabs)" if "'\\t'" in problem else ""
        raise ConfigError(f"{path}:{line} {problem}{hint}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(
            f"{path}:{root.start_mark.line + 1}: expected settings (key: value) at the top "
            f"level, not a {'list' if isinstance(root, yaml.SequenceNode) else 'value'}"
        )
    found: KeyLines = {}

    def walk(node: yaml.Node, at: tuple[str | int, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = (*at, str(key.value))
                found[here] = key.start_mark.line + 1
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                found[(*at, index)] = item.start_mark.line + 1
                walk(item, (*at, index))

    walk(root, ())
    return found


def environment_error(exc: SettingsError) -> ConfigError:
    """The error for a ``DETOUR_*`` variable that is not the JSON it must be (a list or map)."""
    match = re.search(r'field "([^"]+)"', str(exc))
    name = f"{ENV_PREFIX}{match[1].upper()}" if match else "a DETOUR_* variable"
    cause = f": {exc.__cause__}" if exc.__cause__ else ""
    return ConfigError(f"environment {name}: not valid JSON{cause}")


def _fields_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """The setting names allowed under ``loc`` (for a did-you-mean), or none if unknown."""
    at: Any = model
    for part in loc:
        field = at.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        annotation = field.annotation
        while not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if not args:
                return []
            annotation = args[-1]  # list[X] and dict[str, X]: X; X | None: X
        at = annotation
    return list(at.model_fields)


def env_name(loc: tuple[str | int, ...]) -> str:
    """The variable that sets the setting at ``loc``: ``DETOUR_CACHE__DIR`` for cache.dir."""
    return ENV_PREFIX + "__".join(str(part).upper() for part in loc)


def describe(
    exc: ValidationError, model: type[BaseModel], path: Path | None, lines: KeyLines
) -> str:
    """One line per error of ``exc``, at the file's line of the key when the file gives it,
    else at the variable that does, else at the key's default."""
    out = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = ".".join(str(part) for part in loc) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden" and isinstance(loc[-1], str):
            close = difflib.get_close_matches(loc[-1], _fields_at(model, loc[:-1]), n=1)
            message = f"unknown setting{f'; did you mean {close[0]!r}?' if close else ''}"
        prefixes = [loc[:n] for n in range(len(loc), 0, -1)]
        variable = next((env_name(at) for at in prefixes if env_name(at) in os.environ), None)
        known = [at for at in prefixes if at in lines]
        if path is not None and loc in lines:  # the file names this very key
            out.append(f"{path}:{lines[loc]}: {key}: {message}")
        elif variable is not None:
            out.append(f"environment {variable}: {key}: {message}")
        elif path is not None and known:
            out.append(f"{path}:{lines[known[0]]}: {key}: {message}")
        elif loc:
            out.append(f"{key} ({env_name(loc)} or its default): {message}")
        else:
            out.append(f"{path or 'settings'}: {message}")
    return "\n".join(out)


# Kubernetes sets <SERVICE>_SERVICE_HOST, <SERVICE>_PORT_7439_TCP and the like for every Service
# of the namespace: a Service named detour-... makes DETOUR_* variables that are not settings.
_SERVICE_LINK = re.compile(
    r"_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_\w+)?)?)$"
)


def unknown_variables(model: type[BaseModel], environ: Mapping[str, str]) -> list[str]:
    """A line for each ``DETOUR_*`` variable that sets nothing in ``model``, with the nearest
    setting's variable: ``DETOUR_CACHE_DIR`` (one underscore) is otherwise silently ignored."""
    valid: set[str] = set()
    maps: set[str] = set()

    def collect(at_model: Any, at: tuple[str, ...]) -> None:
        for name, field in at_model.model_fields.items():
            here = (*at, name)
            valid.add(env_name(here))
            annotation = field.annotation
            origin = get_origin(annotation)
            if origin is dict:
                maps.add(env_name(here) + "__")
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                collect(annotation, here)

    collect(model, ())
    found = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX) or upper in valid or _SERVICE_LINK.search(upper):
            continue
        if any(upper.startswith(prefix) for prefix in maps):
            continue
        close = difflib.get_close_matches(upper, sorted(valid), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        found.append(f"environment {variable} sets no setting{hint}")
    return found
