"""The speculation engine that runs beside the target on the executor's device: the draft's
proposals (`runner.SpecRunner`), their verification against the target's logits
(`verify`), sampling (`sampler`) after vLLM's logits processing (`logits_process`:
penalties, min_tokens, log-probabilities) and the draft's CUDA-graphed steps (`draft_graph`)."""
