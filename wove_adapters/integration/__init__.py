"""Front ends: the Hub API, concurrent.futures executors and the wove bridge."""
