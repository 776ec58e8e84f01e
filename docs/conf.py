"""Sphinx configuration: the user guide (Markdown, via MyST) and the API
reference generated from fastgrad's NumPy-style docstrings (autodoc +
napoleon).  Build, warnings as errors, as CI does:

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs /tmp/fastgrad-docs
"""
import fastgrad

project = "fastgrad"
author = "the fastgrad authors"
copyright = "2026, the fastgrad authors"
release = version = fastgrad.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",      # NumPy-style "Parameters / Returns" sections
    "sphinx.ext.viewcode",
    "myst_parser",              # the guide and scaling.md are Markdown
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "lab.md"]   # generated tables, shown in the README
myst_heading_anchors = 3

napoleon_google_docstring = False
napoleon_numpy_docstring = True
autodoc_member_order = "bysource"
autodoc_typehints = "none"      # the docstrings say the types
autodoc_default_options = {"members": True, "show-inheritance": False}

html_theme = "alabaster"
html_title = f"fastgrad {release}"
