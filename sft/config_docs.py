"""docs/config.md, generated from the config schema in sft/config.py: every field's YAML path, type, default and
description, so the reference cannot drift from the code (tests/test_config_docs.py compares the two).

    python -m sft.config_docs > docs/config.md      # or: make docs
"""
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from sft.config import Config, FileSource, SQLSource

REGENERATE = "python -m sft.config_docs > docs/config.md"

INTRO = f"""\
# Config reference

<!-- Generated from sft/config.py by `{REGENERATE}` (`make docs`); edit the descriptions there, not here. -->

A config is one YAML file with the sections below; `key.sub=value` on the command line overrides any field
(`sft train configs/demo.yaml training.epochs=1`). Unknown keys fail with a did-you-mean, and every problem is
reported at once. Values may use `${{VAR}}` and `${{VAR:-default}}` from the environment or `.env`.
"""

SOURCES_INTRO = """\
## Data sources

`data.train` and `data.eval` take a path (a JSONL/JSON/CSV/Parquet file or a `datasets.save_to_disk` folder), a
mapping of one of the two kinds below, or a list mixing any of them (see [data.md](data.md)).
"""


def render() -> str:
    parts = [INTRO]
    for path, section in sections(Config, ""):
        parts.append(section_table(f"`{path}`" if path else "Top level", section, path))
    parts.append(SOURCES_INTRO)
    for title, source in (("A file or folder: `{path: ..., split: ...}`", FileSource),
                          ("A SQL query: `{database: ..., query: ...}`", SQLSource)):
        parts.append(section_table(title, source, "", level="###"))
    return "\n".join(parts)


def sections(model: type[BaseModel], path: str) -> list[tuple[str, type[BaseModel]]]:
    """This section and every nested one, depth first, each with its YAML path."""
    found = [(path, model)]
    for name, field in documented_fields(model):
        if is_section(field.annotation):
            found += sections(field.annotation, f"{path}.{name}" if path else name)
    return found


def documented_fields(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    # config_path is filled by load_config, never written by a user.
    return [(name, field) for name, field in model.model_fields.items() if not field.exclude]


def is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def section_table(title: str, model: type[BaseModel], path: str, level: str = "##") -> str:
    lines = [f"{level} {title}", ""]
    if doc(model):
        lines += [doc(model), ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in documented_fields(model):
        full = f"{path}.{name}" if path else name
        if is_section(field.annotation):
            lines.append(f"| `{full}` | section | | {cell(doc(field.annotation))} See [`{full}`](#{anchor(full)}). |")
        else:
            lines.append(f"| `{full}` | {cell(type_name(field))} | {cell(default_text(field))} "
                         f"| {cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def doc(model: type[BaseModel]) -> str:
    """The section's own docstring (a section without one would show BaseModel's), on one line."""
    return " ".join((model.__dict__.get("__doc__") or "").split())


def type_name(field: FieldInfo) -> str:
    text = annotation_text(field.annotation)
    limits = [f"{sign} {getattr(rule, attr)}" for rule in field.metadata
              for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")) if hasattr(rule, attr)]
    return f"{text} ({', '.join(limits)})" if limits else text


def annotation_text(annotation: Any) -> str:
    if annotation in (FileSource, SQLSource) or _mentions_source(annotation):
        return "source ([data sources](#data-sources))"
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return annotation_text(typing.get_args(annotation)[0])
    if origin is Literal:
        values = [f"`{value}`" for value in typing.get_args(annotation)]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        named = [annotation_text(arg) for arg in args if arg is not type(None)]
        return " or ".join(named) + (" or `null`" if type(None) in args else "")
    if origin is list:
        return f"list of {annotation_text(typing.get_args(annotation)[0])}"
    if is_section(annotation):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _mentions_source(annotation: Any) -> bool:
    return any(arg in (FileSource, SQLSource) or _mentions_source(arg) for arg in typing.get_args(annotation))


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return f"`{yaml_value(field.default_factory())}`"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{yaml_value(field.default)}`"


def yaml_value(value: Any) -> str:
    """A default as a user would write it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, BaseModel):
        return "{}"
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(item) for item in value) + "]"
    return str(value)


def cell(text: str) -> str:
    """Markdown table cells end at `|`; descriptions are one line."""
    return " ".join(text.split()).replace("|", "\\|")


def anchor(path: str) -> str:
    """GitHub's heading anchor for "## `training`" style headings: lower case, dots and backticks dropped."""
    return path.replace(".", "").lower()


if __name__ == "__main__":
    print(render(), end="")
