"""Tasks with exact ground truth and what turns them into batches: the modular-arithmetic reference task, toy text
tasks (`text`), the tokenizers behind one protocol (`tokenizer`, `hf_tokenizer`) and the (prompt, completion) data
pipeline (`data`)."""
