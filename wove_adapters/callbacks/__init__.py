"""The way back: signed payloads out, signed events in, and the worker that joins them."""
