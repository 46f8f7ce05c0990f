"""The configuration keys as `--help` lists them: every key with its default and docstring, grouped by component,
read from the dataclasses themselves so the list cannot drift from the code."""
import ast
import dataclasses
import inspect
import json
import textwrap
import typing
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 100


@lru_cache(maxsize=None)
def field_docs(cls) -> dict:
    """{field name: docstring} from the string literal under each annotated field of `cls` (an attribute
    docstring: Python keeps none at run time, so it is read from the source); {} when the source is unavailable."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def show(value) -> str:
    """A value as it is written on the command line (YAML): null, true, [0.08, 1.0]."""
    return value if isinstance(value, str) else json.dumps(value)


def _where(cls) -> str:
    try:
        return str(Path(inspect.getsourcefile(cls)).resolve().relative_to(ROOT))
    except (TypeError, ValueError):
        return cls.__module__


def _entry(key: str, value, doc: str, indent: str) -> list:
    lines = [f"{indent}{key}={show(value)}"]
    if doc:
        lines += textwrap.wrap(doc, WIDTH, initial_indent=indent + "    ", subsequent_indent=indent + "    ")
    return lines


def optional_group(cls, f: dataclasses.Field):
    """The dataclass of a field that is null by default and a component when set (Optional[SomeConfig]), else None."""
    hint = typing.get_type_hints(cls).get(f.name)
    if typing.get_origin(hint) is typing.Union:
        groups = [arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)]
        if len(groups) == 1 and type(None) in typing.get_args(hint):
            return groups[0]
    return None


def _section(cls, prefix: str) -> list:
    """The leaf keys of `cls` first, then one group per nested dataclass (a component), recursively. A component
    that is off (null) by default is listed as a key, and its keys as a group with the defaults they take when set."""
    lines, groups = [], []
    for f in dataclasses.fields(cls):
        value = default_of(f)
        if dataclasses.is_dataclass(value):
            groups.append((f"{prefix}{f.name}", type(value), ""))
            continue
        lines += _entry(f"{prefix}{f.name}", value, field_docs(cls).get(f.name, ""), "  ")
        if value is None and (group := optional_group(cls, f)) is not None:
            groups.append((f"{prefix}{f.name}", group, ", when set"))
    for name, group, when in groups:
        lines += ["", f"{name}{when}: {group.__name__} in {_where(group)}", *_section(group, f"{name}.")]
    return lines


def describe(config_cls) -> str:
    """Every key of `config_cls` (the root config) with its default and docstring, grouped by component."""
    heading = "configuration keys, each as key=default (override any with key=value):"
    return "\n".join([heading, "", *_section(config_cls, "")])
