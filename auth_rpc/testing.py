"""pytest plugin: in-process Auth and Posts servers and a token factory.

Loaded automatically (``pytest11`` entry point) when the package is installed.
"""

from __future__ import annotations
