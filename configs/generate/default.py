"""Generation: an imported HF checkpoint or a trained Lumen LM continues prompts from a local text file or the task.

One prompt per line of `prompts.text_file` (tokenized by the model's tokenizer, BOS first where the model has one;
whitespace-separated token ids with `prompts.format="ids"`, the default when the folder has no tokenizer.json), or,
without a file, held-out arithmetic problems (`prompts.task_problems`, graded by exact match). Sampling settings are
`generate`'s; `sampling.stop_tokens` is "eos" (the model's EOS ids), "none" or comma-separated ids ("2,13").

COMMAND: python -m scripts.launch --config=configs/generate/default.py --workdir=runs/generate \
           --config.model.hf_path=tests/assets/hf/llama_nopad --config.prompts.text_file=prompts.txt
         (a trained LM instead: --config.lm.workdir=runs/quickstart, prompts from the arithmetic task)
RUNTIME: ~10 CPU-s on a 2-core CPU for 8 prompts x 32 tokens of the tiny goldens (mostly start-up and one compile).
EXPECT: results/generations.jsonl (one record per prompt: prompt, completion, token ids, lengths, stop reason)
        and results/generate_summary.json; a short summary printed.
"""

import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, max_new_tokens=32, temperature=0.0)
    config = ml_collections.ConfigDict()
    config.experiment = "generate"
    config.seed = 0
    # The model: a local HF folder (its config.json decides the architecture; these runtime fields how Lumen runs
    # it), or a train_lm workdir (lm.workdir). Exactly one of the two.
    config.model = ml_collections.ConfigDict(
        dict(
            hf_path=config_dict.placeholder(str),
            attention_impl=config_dict.placeholder(str),
            dtype=config_dict.placeholder(str),
            param_dtype=config_dict.placeholder(str),
        )
    )
    config.lm = ml_collections.ConfigDict(dict(workdir=config_dict.placeholder(str)))
    config.prompts = ml_collections.ConfigDict(
        dict(
            text_file=config_dict.placeholder(str),  # one prompt per line; empty lines are skipped
            format="auto",  # "text", "ids" (whitespace-separated token ids, used as given) or "auto"
            limit=config_dict.placeholder(int),  # at most this many prompts (the file's first lines)
            task_problems=8,  # without a text file: this many held-out arithmetic problems ...
            task_num_steps=config_dict.placeholder(int),  # ... with this K (None: the LM's K range)
        )
    )
    config.sampling = ml_collections.ConfigDict(
        dict(
            temperature=args.temperature,  # 0 = greedy
            top_k=config_dict.placeholder(int),
            top_p=config_dict.placeholder(float),
            max_new_tokens=args.max_new_tokens,
            stop_tokens="eos",
            batch_size=8,  # prompts per `generate` call
        )
    )
    config.lock()
    return config
