"""Sharing: model cards of nodes and runs (rendered by hub_cards), Hub upload and download."""
