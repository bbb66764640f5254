"""The model: the Llama family in Flax NNX (`llama`), checkpoint import (`checkpoint`), the
tokenizer (`tokenizer`) and a cache-free dense decode used as the tests' reference (`reference`)."""
