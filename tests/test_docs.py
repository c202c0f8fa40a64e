"""The documentation describes the code as it is: the configuration reference is regenerated
and compared, and every relative link in the README and docs/ points at a file that exists."""

from __future__ import annotations

import importlib.util
import re

from tests.conftest import ROOT


def test_configuration_reference_is_current():
    spec = importlib.util.spec_from_file_location("make_config_reference", ROOT / "docs" / "make_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.render()
    assert (ROOT / "docs" / "configuration.md").read_text() == text, (
        "docs/configuration.md is stale: run python docs/make_config_reference.py")
    # Independent of the generator: every field of every section appears as a row.
    import dataclasses

    from pipeline.config import Config

    for f in dataclasses.fields(Config):
        assert f"| `{f.name}` |" in text or f"## `{f.name}`" in text, f.name


def test_relative_links_in_the_readme_and_docs_resolve():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "cluster").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://|mailto:|#", target):
                continue
            path = target.split("#")[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
