"""Write docs/configuration.md from the config dataclasses in pipeline/config.py.

    python docs/make_config_reference.py          # rewrite the file
    python docs/make_config_reference.py --check  # exit 1 if the file is stale

Each section's text is its dataclass's docstring; each key's line comes from the field: its type,
default, allowed values (the validation metadata) and the comment beside it in the source.
tests/test_docs.py fails when the file differs from what this script writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import typing
from pathlib import Path

from pipeline.config import Config, SmolConfig, _type_name, field_docs

OUT = Path(__file__).resolve().parent / "configuration.md"

HEADER = """# Configuration reference

A job is one YAML file (`jobs/configs/*.yaml`); any key can be overridden on the command line
as `section.key=value` (for example `citer train jobs/configs/demo.yaml eval.n_examples=100
collect.num_actors=2`). Every key is checked when the file loads: an unknown key (with the
closest known one), a wrong type, a value outside its allowed set or range, or a missing
required key is refused with one line naming the key and where it came from. Which keys a
resumed run may change is in [pipeline.md](pipeline.md#what-a-resume-may-change).

This file is generated from `pipeline/config.py` by `python docs/make_config_reference.py`; do
not edit it by hand (a test fails when it is stale).
"""


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "required"
    return "null" if value is None else f"`{value!r}`".replace("|", "\\|")


def _allowed(f: dataclasses.Field) -> str:
    meta = f.metadata
    parts = []
    if meta.get("choices"):
        parts.append("one of " + ", ".join("null" if c is None else f"`{c}`" for c in meta["choices"]))
    if meta.get("range"):
        lo, hi = meta["range"]
        parts.append(f"≥ {lo}" if hi is None else f"{lo} to {hi}")
    if meta.get("unit_items"):
        parts.append("each in 0 to 1")
    if meta.get("item_range"):
        lo, hi = meta["item_range"]
        parts.append(f"each ≥ {lo}" if hi is None else f"each {lo} to {hi}")
    if meta.get("item_choices"):
        parts.append("each one of " + ", ".join(f"`{c}`" for c in meta["item_choices"]))
    if meta.get("key_choices"):
        parts.append("top-level DeepSpeed keys")
    if meta.get("distinct"):
        parts.append("no repeats")
    return "; ".join(parts)


def _section(cls: type, title: str) -> list[str]:
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    lines = [f"## {title}", "", inspect.cleandoc(cls.__doc__ or ""), "",
             "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(typing.get_args(hints[f.name])[0] if typing.get_args(hints[f.name])
                                    else hints[f.name]):
            continue
        kind = _type_name(hints[f.name]).replace("|", "\\|")
        meaning = docs[f.name].replace("|", "\\|")
        lines.append(f"| `{f.name}` | {kind} | {_default(f)} | {_allowed(f)} | {meaning} |")
    return [*lines, ""]


def render() -> str:
    """The whole reference, as this code's dataclasses define it."""
    out = [HEADER, *_section(Config, "Top level")]
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        kind = hints[f.name]
        inner = [a for a in typing.get_args(kind) if dataclasses.is_dataclass(a)] or [kind]
        if dataclasses.is_dataclass(inner[0]):
            out += _section(inner[0], f"`{f.name}`")
    out += ["# World builders", "",
            "`citer build-demo` takes the keys of the `demo` section above as options, and `citer build-smol` "
            "these (`--slm-layers 8` for `slm_layers`).", ""]
    out += _section(SmolConfig, "`citer build-smol`")
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale")
    text = render()
    if parser.parse_args().check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python docs/make_config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
