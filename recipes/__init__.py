"""The recipe files (`*.toml`), shipped as package data so a non-editable install finds them by name too."""

__all__: list[str] = []
