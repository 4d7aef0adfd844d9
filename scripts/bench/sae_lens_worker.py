"""SAELens side of scripts/bench/sae.py; runs in a Python with torch + sae-lens (e.g. .venv-parity), not in Lumen's.

  python scripts/bench/sae_lens_worker.py TRAIN.npy EVAL.npy '{"n_latents": 512, "k": 16, ...}'

Trains sae_lens' TopKTrainingSAE with its own training_forward_pass (MSE + its TopK AuxK loss) and torch Adam on
the given (already normalised) activations; prints one JSON line: tokens/s after the first step, final FVU, the
fraction of latents dead at the end of training (no firing for dead_window tokens), the fraction that never fire on
the held-out rows, and the training-batch FVU every log_every steps (one float per step is cheap next to the step).
Optional spec key rescale_acts_by_decoder_norm (default: SAELens' own default, True).
"""

import json
import sys
import time

import numpy as np
import sae_lens
import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput


def main():
    train = torch.from_numpy(np.load(sys.argv[1]))
    evals = torch.from_numpy(np.load(sys.argv[2]))
    a = json.loads(sys.argv[3])
    torch.manual_seed(a["seed"])
    torch.set_num_threads(a["threads"])
    kwargs = {}
    if "rescale_acts_by_decoder_norm" in a:
        kwargs["rescale_acts_by_decoder_norm"] = bool(a["rescale_acts_by_decoder_norm"])
    cfg = TopKTrainingSAEConfig(d_in=train.shape[1], d_sae=a["n_latents"], k=a["k"], decoder_init_norm=1.0, **kwargs)
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=a["lr"], betas=(0.9, 0.999))
    g = torch.Generator().manual_seed(a["seed"])
    since_fired = torch.zeros(a["n_latents"])
    log_every = a.get("log_every", 50)
    history, batch_fvu = [], []
    t0 = None
    for step in range(a["steps"]):
        idx = torch.randint(0, len(train), (a["batch_size"],), generator=g)
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=train[idx],
                coefficients={},
                dead_neuron_mask=since_fired >= a["dead_window"],
                n_training_steps=step,
                is_logging_step=False,
            )
        )
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            fired = (out.feature_acts != 0).any(dim=0)
            since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + a["batch_size"])
            x_in = out.sae_in
            batch_fvu.append(((x_in - out.sae_out) ** 2).sum() / ((x_in - x_in.mean(0)) ** 2).sum())
        if (step + 1) % log_every == 0 or step + 1 == a["steps"]:
            history.append({"step": step + 1, "fvu": float(torch.stack(batch_fvu).mean())})
            batch_fvu = []
        if step == 0:
            t0 = time.perf_counter()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        f = sae.encode(evals)
        x_hat = sae.decode(f)
        fvu = float(((evals - x_hat) ** 2).sum() / ((evals - evals.mean(0)) ** 2).sum())
        dead_eval = float(((f != 0).sum(0) == 0).float().mean())
        l0 = float((f != 0).sum(-1).float().mean())
    print(
        json.dumps(
            {
                "tokens_per_s": (a["steps"] - 1) * a["batch_size"] / seconds,
                "fvu": fvu,
                "l0": l0,
                "dead_fraction_train": float((since_fired >= a["dead_window"]).float().mean()),
                "dead_fraction_eval": dead_eval,
                "history": history,
                "torch": torch.__version__,
                "sae_lens": sae_lens.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
