"""Sphinx configuration of the qatcore docs: Markdown pages read by myst-parser."""

project = "qatcore"
author = "the qatcore authors"

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]

# Anchors for headings down to level 3, so that links like
# plugin-authors.md#testing-a-plugin resolve.
myst_heading_anchors = 3

html_theme = "alabaster"
