"""One LightningDataModule per dataset, registered by name with ``@register_datamodule``."""
