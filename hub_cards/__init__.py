"""GWM's model-card templates and their rendering: `templates/adapter_card.md` (one DAG node) and
`templates/curriculum_card.md` (a run's index card), filled with huggingface_hub's `ModelCard`.

A leaf package: it imports nothing of `modeling_gwm`. `modeling_gwm.hub.cards` reads a run folder into a template's
context and renders it here (`render.py`); `lineage.py` draws a run's lineage graph, for the cards and for `gwm dag`
(`Curriculum.mermaid`). The templates travel in the wheel as package data of this package.
"""

from __future__ import annotations

from .lineage import ancestors, lineage_mermaid, parent_weights
from .render import ADAPTER_CARD_TEMPLATE, CURRICULUM_CARD_TEMPLATE, card_template, format_value, render_card

__all__ = ["ADAPTER_CARD_TEMPLATE", "CURRICULUM_CARD_TEMPLATE", "ancestors", "card_template", "format_value",
           "lineage_mermaid", "parent_weights", "render_card"]
