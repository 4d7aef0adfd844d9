"""Tasks with exact ground truth: the modular-arithmetic reference task, its tokenizer and data pipeline."""
