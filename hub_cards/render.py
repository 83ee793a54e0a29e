"""Filling a card template: `render_card`, and `format_value`, how a card writes a number."""

from __future__ import annotations

import importlib.resources
import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from huggingface_hub import ModelCard, ModelCardData

ADAPTER_CARD_TEMPLATE = "adapter_card.md"
CURRICULUM_CARD_TEMPLATE = "curriculum_card.md"


def format_value(value, digits: int = 4) -> str:
    """Numbers for people: 4 significant digits, thousands separators for integers, '—' when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.{digits}g}"


def card_template(name: str) -> str:
    """A card template's text, read as package data (works from a wheel, a zip or a source checkout alike)."""
    return importlib.resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")


def render_card(template_name: str, card_data: ModelCardData, **context) -> ModelCard:
    """The card of `templates/<template_name>` filled with `card_data` (its YAML header) and `context`, with the blank
    lines that optional template sections leave behind collapsed."""
    from huggingface_hub import ModelCard  # here: format_value's users (the curriculum's lineage) need no Hub library

    card = ModelCard.from_template(card_data, template_str=card_template(template_name), **context)
    return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)).rstrip() + "\n")


__all__ = ["ADAPTER_CARD_TEMPLATE", "CURRICULUM_CARD_TEMPLATE", "card_template", "format_value", "render_card"]
