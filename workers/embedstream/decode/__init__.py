"""Decoders: raw message bytes -> a typed record ready for the model, or a BadRecord value."""
