"""One module per attack, registered by name with ``@register_attack``."""
