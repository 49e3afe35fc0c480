"""One module per defense, registered by name with ``@register_defense``."""
