"""mkdocs hook: Sphinx roles in docstrings (``:class:`Solution```) rendered as code.

The docstrings use Sphinx's roles (``:class:``, ``:func:``, ``:attr:``, ...), which Python's
``help()`` shows as they are and mkdocstrings renders as the role's name followed by the code
(":class:Solution" on the page). This drops the role, leaving the code.
"""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj|const):(<code)")


def strip_roles(html: str) -> str:
    """``:class:<code>X</code>`` -> ``<code>X</code>``."""
    return ROLE.sub(r"\1", html)


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    return strip_roles(html)
