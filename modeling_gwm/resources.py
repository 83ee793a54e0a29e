"""The files GWM ships besides its code: the demo curriculum and its public-domain data, accelerate launch configs.

In a source checkout they are `configuration/` next to the package; an installed wheel carries the same files as
package data in `modeling_gwm/configuration/` (pyproject.toml maps one onto the other). The tiny base's weights are
not in the wheel: `gwm make-tiny-base DIR` writes the same seeded checkpoint (`base.make_tiny_cogvideox`).
"""

from __future__ import annotations

import os

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_CANDIDATES = (os.path.join(_PACKAGE, "configuration"),  # an installed wheel
               os.path.join(os.path.dirname(_PACKAGE), "configuration"))  # a source checkout (or an editable install)


def shipped_path(*parts: str) -> str:
    """Absolute path of a shipped file, e.g. `shipped_path("curricula", "demo.yaml")`: the wheel's copy when the
    package is installed, the checkout's `configuration/` otherwise (the first that exists; else the checkout's)."""
    for root in _CANDIDATES:
        path = os.path.join(root, *parts)
        if os.path.exists(path):
            return path
    return os.path.join(_CANDIDATES[-1], *parts)


DEMO_CURRICULUM = shipped_path("curricula", "demo.yaml")
DATA_DIR = shipped_path("data")
