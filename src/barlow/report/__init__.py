"""``barlow report``: one self-contained HTML page about one or more runs, and ``barlow views``.

``build_report`` (``page.py``) reads run directories (``runs.py``, ``insight.py``), draws the
figures (``figures.py``, matplotlib PNGs inlined as base64; ``tiles.py``, image grids), maps the
test representations to 2-D (``embedding_map.py``) and writes the page atomically. Nothing on the
page is fetched: it opens offline, from a file, without a server.
"""

from __future__ import annotations
