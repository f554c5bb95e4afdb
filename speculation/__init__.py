"""The speculation engine that runs beside the target on the executor's device: the draft's
proposals (`runner.SpecRunner`), their verification against the target's logits
(`verify`), sampling (`sampler`) and the draft's CUDA-graphed steps (`draft_graph`)."""
