"""The victim zoo: every model maps (input_shape, num_classes, **options) to a logits network.

Each builder is registered with ``@register_model`` and receives the datamodule's input shape
(C, H, W) and class count; initialisation is made deterministic by the caller
(:func:`leakbench.client.build_victim` seeds the global RNG around the builder).
"""
