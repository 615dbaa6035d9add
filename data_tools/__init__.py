"""Infrared corpus tools: sources, robust image reading, region proposals, WebDataset shards,
the online object-sensitive RoI crop, and the synthetic thermal scene generator."""

SAMPLE_SCHEMA_VERSION = 1
