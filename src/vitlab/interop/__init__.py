"""Weight converters between vitlab and other ViT implementations, and export."""
