"""Built-in transports that need no server: in-process threads and stdio worker processes."""
