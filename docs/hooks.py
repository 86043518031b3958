"""mkdocs hooks (mkdocs.yml `hooks:`): two touches to the API reference mkdocstrings renders.

- A keyword whose default is a private sentinel (``add(model, rate, *, schedule=_UNSET)``: "not given",
  so that a DropPathConfig and keywords are not mixed) shows as ``schedule=…`` rather than as
  ``<object object at 0x7f…>``, an address that changes with every build.
- Sphinx roles in docstrings (``:class:`~pathsurgeon.DropPathConfig```, ``:func:`add```), which markdown
  renders as the role's name before the code, show as the code alone (``~`` keeps the last name only).
"""

from __future__ import annotations

import re

_SENTINEL = re.compile(
    r'=&lt;</span><span class="nb">object</span> <span class="nb">object</span> <span class="n">at</span> '
    r'<span class="mh">0x[0-9a-f]+</span><span class="o">&gt;</span>'
)
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):<code>(~?)([^<]*)</code>")


def _role(match: re.Match) -> str:
    name = match[2].rsplit(".", 1)[-1] if match[1] else match[2]
    return f"<code>{name}</code>"


def on_page_content(html: str, **_) -> str:
    html = _SENTINEL.sub('=</span><span class="n">…</span>', html)
    return _ROLE.sub(_role, html)
