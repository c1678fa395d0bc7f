"""`ladder bench` and the caching and serving benchmarks."""

# The methods `ladder bench` compares, in table order (bench/methods.py runs each).
METHODS = ("full", "lora", "bitfit", "lst_online", "lst_cached")
