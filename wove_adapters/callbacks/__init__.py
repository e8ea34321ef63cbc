"""The way back, the caller's side: the HTTP receiver and the Redis drop-box reader that
take signed events in. The worker's side (runner, sender) is ``wove_adapters.worker``."""
