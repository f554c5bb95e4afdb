"""Where a model's weights come from: the embedded default model and the W2 pair (GGUF
files converted once into checkpoint folders), constructed and random weights for
benchmarks, and `open.open_source` to open any of them from a picklable description.
Reading a checkpoint folder tensor by tensor stays in `models/checkpoint.py`, beside the
layer layout it fills."""
