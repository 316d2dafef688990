"""MkDocs hook: the scenario reference page, generated from the schema at build time (never written by hand)."""

from __future__ import annotations

from mkdocs.structure.files import File


def on_files(files, config):
    from fedsim.config.reference import markdown

    files.append(File.generated(config, "scenario-reference.md", content=markdown()))
    return files
