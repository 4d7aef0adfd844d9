"""Lumen side of the quantised-export golden: GPTQ int4 on a committed HF golden case, exported for transformers.

`export_case(case)` is the one recipe both this script and tests/test_hf_export.py use: the golden case's model,
GPTQ int4 (group 32) calibrated on its golden input_ids plus a row of token 0 (content for a model without a pad,
such as qwen2_nobos), then `hf.save_hf_checkpoint(..., source=case folder)`, which stores the quantised weights
dequantised. The parity venv then records transformers' logits of that export as the fixture `make test` compares
Lumen's quantised logits against (<= 1e-4):

COMMAND: .venv/bin/python scripts/golden/hf_export_goldens.py --out /tmp/lumen_export
         .venv-parity/bin/python scripts/golden/hf_goldens.py --save-logits /tmp/lumen_export \
             --logits-name gptq_int4_logits.safetensors
RUNTIME: ~30 s on a busy 2-core CPU.  EXPECT: tests/assets/hf/qwen2_nobos/gptq_int4_logits.safetensors (13 kB).
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import safetensors.numpy

from framework import quant
from framework.models import hf

ASSETS = pathlib.Path(__file__).resolve().parents[2] / "tests" / "assets" / "hf"
CASES = ("qwen2_nobos",)
LOGITS_FILE = "gptq_int4_logits.safetensors"
QUANT = dict(fmt="int4", group_size=32)


def calibration_batches(case: str) -> list[np.ndarray]:
    """The golden input_ids [2, 17] and a [1, 17] row of token 0 (real content: no pad id is assumed)."""
    ids = safetensors.numpy.load_file(str(ASSETS / case / "golden.safetensors"))["input_ids"].astype(np.int32)
    return [ids, np.zeros((1, ids.shape[1]), np.int32)]


def quantized_case(case: str):
    """(LMConfig, GPTQ int4 params) of golden case `case`."""
    cfg, params = hf.load_hf_checkpoint(ASSETS / case)
    qparams = quant.quantize(params, quant.QuantConfig(**QUANT), "gptq", calibration_batches(case), model_cfg=cfg)
    return cfg, qparams


def export_case(case: str, out: pathlib.Path, quantized=None) -> pathlib.Path:
    """Writes the GPTQ int4 model of `case` (`quantized_case(case)` unless given) as an HF folder `out/<case>`
    (weights dequantised); returns it."""
    cfg, qparams = quantized_case(case) if quantized is None else quantized
    return hf.save_hf_checkpoint(qparams, cfg, out / case, source=ASSETS / case)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()
    for case in CASES:
        print("exported", export_case(case, args.out))


if __name__ == "__main__":
    main()
