"""Arithmetic expressions rendered to images, deterministically from a seed, and the VLM's batches built from them.

Glossary: B batch, T tokens, H/W image height/width (pixels), N image tokens per image.

`render_expression("23+45*03", seed=7)` draws the characters with a 3x5 bitmap font (digits, + - * =) scaled by an
integer factor, at a jittered position, each glyph nudged up or down by a pixel, with optional distractor glyphs
(shapes that are not in the expression alphabet) in the free space and Gaussian pixel noise; the image is float32
[H, W, 1] in [-1, 1] (background -1, ink +1: SigLIP's range). Everything random comes from
`np.random.default_rng([seed, ...])`, so an image is a pure function of its text, seed and knobs. With
`cell=P` (the ViT's patch size) character i is drawn alone inside grid cell i of the line instead, so one patch holds
one character, and `cell_text` gives the image as text: each cell's character, row-major (" " for an empty cell).

The VLM task: example i of a stream is the arithmetic problem `Knobs.problem_at(stream_seed, i)` (framework.tasks
.arithmetic), its expression rendered with seed i. Prompts ask either to read it ("read:" -> "23+45*03") or to
compute it ("value:" -> "87", the chain's answer mod M, left to right as the arithmetic task defines it; with
`answer="trace"` the completion is the arithmetic task's gold trace instead, one "a+b=c" line per step then "A 87",
the text `arithmetic.check_solution` grades). A row is
`[IMG] * N + [BOS] + prompt + completion + [EOS]` right-padded with PAD, in the printable-text tokenizer's ids with
the image placeholder IMAGE_TOKEN_ID = 100 after them (`VLMTokenizer`); the loss is on the completion and the EOS,
and the prefix (image + BOS + prompt) is the prefix-LM mask's. `text=True` writes the expression as text instead of an image:
into the prompt ("value:23+45*03" -> "87", layout "prompt") or as the cells' characters where the image tokens go
(layout "grid"): the text-only task a language model can be pretrained on.
`make_vlm_dataset` serves batches as a step-indexed grain MapDataset, like `framework.tasks.data`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from framework.tasks import arithmetic
from framework.tasks.data import split_seed
from framework.tasks.tokenizer import BOS_ID, EOS_ID, PAD_ID, TEXT_TOKENIZER, TEXT_VOCAB_SIZE, check_token_ids

IMAGE_TOKEN_ID = TEXT_VOCAB_SIZE  # the first id after the printable-text tokenizer's
MODES = ("read", "compute", "mixed")
LAYOUTS = ("prompt", "grid")
ANSWERS = ("value", "trace")
PROMPTS = {"read": "read:", "compute": "value:"}

_FONT_ROWS = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    "+": ("000", "010", "111", "010", "000"),
    "-": ("000", "000", "111", "000", "000"),
    "*": ("000", "101", "010", "101", "000"),
    "=": ("000", "111", "000", "111", "000"),
    " ": ("000", "000", "000", "000", "000"),
}
_DISTRACTOR_ROWS = (  # shapes no expression character has
    ("110", "110", "000", "000", "000"),
    ("000", "000", "010", "010", "000"),
    ("100", "010", "001", "000", "000"),
    ("000", "011", "011", "000", "000"),
)
FONT = {c: np.array([[ch == "1" for ch in row] for row in rows], bool) for c, rows in _FONT_ROWS.items()}
DISTRACTORS = tuple(np.array([[ch == "1" for ch in row] for row in rows], bool) for rows in _DISTRACTOR_ROWS)
GLYPH_H, GLYPH_W = 5, 3


@dataclasses.dataclass(frozen=True)
class RenderKnobs:
    """How expressions are drawn: image size, glyph scale range, jitter, noise and distractors."""

    height: int = 32
    width: int = 64
    scale: tuple[int, int] = (2, 2)  # inclusive range of the integer glyph scale
    jitter: bool = True  # random placement of the text and +-1 px per glyph (else centred, level)
    noise: float = 0.0  # std of Gaussian pixel noise (pixels are clipped back into [-1, 1])
    distractors: int = 0  # distractor glyphs drawn where the text is not
    cell: int = 0  # > 0: character i fills grid cell i of a cell x cell grid (set it to the ViT's patch size)
    line_jitter: bool = False  # with `cell`: the line starts at a random row and cell (else the top left cell)

    def __post_init__(self):
        object.__setattr__(self, "scale", tuple(int(s) for s in self.scale))
        if not (32 <= self.height <= 64 and 32 <= self.width <= 256):
            raise ValueError(f"render: height={self.height}, width={self.width}; expected 32-64 x 32-256 px")
        lo, hi = self.scale
        if not 1 <= lo <= hi:
            raise ValueError(f"render: scale={self.scale}; expected an inclusive range (lo, hi) with 1 <= lo <= hi")
        if self.noise < 0 or self.distractors < 0:
            raise ValueError(f"render: noise={self.noise}, distractors={self.distractors}; expected >= 0")
        if self.cell < 0 or (self.cell and (self.height % self.cell or self.width % self.cell)):
            raise ValueError(f"render: cell={self.cell}; expected 0 or a divisor of height={self.height} and width")
        if self.cell and self.cell < max(GLYPH_W, GLYPH_H) * hi:
            raise ValueError(f"render: cell={self.cell} px is smaller than a glyph at scale {hi} ({GLYPH_H * hi} px)")

    def max_chars(self, scale: int | None = None) -> int:
        """Characters that fit on one line at `scale` (default the largest)."""
        s = self.scale[1] if scale is None else scale
        if self.cell:
            return self.width // self.cell
        return (self.width - 2 + s) // ((GLYPH_W + 1) * s)


def render_expression(text: str, *, seed: int, knobs: RenderKnobs | Mapping[str, Any] | None = None) -> np.ndarray:
    """The expression `text` drawn as a float32 [H, W, 1] image in [-1, 1], a pure function of (text, seed, knobs)."""
    k = knobs if isinstance(knobs, RenderKnobs) else RenderKnobs(**dict(knobs or {}))
    bad = [c for c in text if c not in FONT]
    if bad:
        raise ValueError(f"render: character {bad[0]!r} of {text!r} is not in the font {''.join(FONT)!r}")
    rng = np.random.default_rng([int(seed), len(text)])
    fits = [s for s in range(k.scale[0], k.scale[1] + 1) if len(text) <= k.max_chars(s)]
    if not fits:
        raise ValueError(
            f"render: {text!r} ({len(text)} characters) does not fit {k.width} px at scale {k.scale[0]} "
            f"(at most {k.max_chars(k.scale[0])}); widen the image or shorten the expression"
        )
    s = int(rng.choice(fits))
    if k.cell:
        return _render_in_cells(text, s, k, rng)
    gw, gh, step = GLYPH_W * s, GLYPH_H * s, (GLYPH_W + 1) * s
    text_w = len(text) * step - s
    free_x, free_y = k.width - text_w, k.height - gh - 2
    x0 = int(rng.integers(0, free_x + 1)) if k.jitter else free_x // 2
    y0 = int(rng.integers(1, free_y + 2)) if k.jitter else free_y // 2 + 1
    ink = np.zeros((k.height, k.width), bool)
    for i, c in enumerate(text):
        dy = int(rng.integers(-1, 2)) if k.jitter else 0
        y = min(max(y0 + dy, 0), k.height - gh)
        ink[y : y + gh, x0 + i * step : x0 + i * step + gw] |= np.kron(FONT[c], np.ones((s, s), bool))
    box = (max(y0 - 2, 0), y0 + gh + 2, max(x0 - s, 0), x0 + text_w + s)
    for _ in range(k.distractors):
        shape = DISTRACTORS[int(rng.integers(len(DISTRACTORS)))]
        for _try in range(8):  # a free spot outside the text's box, else none
            y, x = int(rng.integers(0, k.height - GLYPH_H + 1)), int(rng.integers(0, k.width - GLYPH_W + 1))
            if y + GLYPH_H <= box[0] or y >= box[1] or x + GLYPH_W <= box[2] or x >= box[3]:
                ink[y : y + GLYPH_H, x : x + GLYPH_W] |= shape
                break
    img = np.where(ink, 1.0, -1.0).astype(np.float32)
    if k.noise:
        img = np.clip(img + rng.normal(0.0, k.noise, img.shape), -1.0, 1.0).astype(np.float32)
    return img[:, :, None]


def _line_origin(text: str, k: RenderKnobs, rng: np.random.Generator) -> tuple[int, int]:
    rows, cols = k.height // k.cell, k.width // k.cell
    if not k.line_jitter:
        return 0, 0
    return int(rng.integers(rows)), int(rng.integers(cols - len(text) + 1))


def cell_text(text: str, *, seed: int, knobs: RenderKnobs | Mapping[str, Any]) -> str:
    """What each grid cell of `render_expression(text, seed, knobs)` holds, row-major (" " for an empty cell): the
    image as text, one character per patch when `knobs.cell` is the ViT's patch size."""
    k = knobs if isinstance(knobs, RenderKnobs) else RenderKnobs(**dict(knobs))
    if not k.cell:
        raise ValueError("cell_text: knobs.cell is 0 (free placement has no character grid)")
    rng = np.random.default_rng([int(seed), len(text)])
    fits = [s for s in range(k.scale[0], k.scale[1] + 1) if len(text) <= k.max_chars(s)]
    rng.choice(fits)  # the draw render_expression makes first
    row, col0 = _line_origin(text, k, rng)
    cols = k.width // k.cell
    grid = [" "] * ((k.height // k.cell) * cols)
    for i, ch in enumerate(text):
        grid[row * cols + col0 + i] = ch
    return "".join(grid)


def _render_in_cells(text: str, s: int, k: RenderKnobs, rng: np.random.Generator) -> np.ndarray:
    """Character i in cell i of the line (row-major grid of cell x cell px): with `jitter` each glyph sits at a random
    offset inside its cell (never leaving it), else centred; `line_jitter` picks the line's row and first cell."""
    c, gw, gh = k.cell, GLYPH_W * s, GLYPH_H * s
    rows, cols = k.height // c, k.width // c
    row, col0 = _line_origin(text, k, rng)
    ink = np.zeros((k.height, k.width), bool)
    for i, ch in enumerate(text):
        dy = int(rng.integers(c - gh + 1)) if k.jitter else (c - gh) // 2
        dx = int(rng.integers(c - gw + 1)) if k.jitter else (c - gw) // 2
        y, x = row * c + dy, (col0 + i) * c + dx
        ink[y : y + gh, x : x + gw] = np.kron(FONT[ch], np.ones((s, s), bool))
    for _ in range(k.distractors):  # in cells the text does not use
        free = [(r, q) for r in range(rows) for q in range(cols) if r != row or not col0 <= q < col0 + len(text)]
        r, q = free[int(rng.integers(len(free)))]
        y, x = r * c + int(rng.integers(c - GLYPH_H + 1)), q * c + int(rng.integers(c - GLYPH_W + 1))
        ink[y : y + GLYPH_H, x : x + GLYPH_W] |= DISTRACTORS[int(rng.integers(len(DISTRACTORS)))]
    img = np.where(ink, 1.0, -1.0).astype(np.float32)
    if k.noise:
        img = np.clip(img + rng.normal(0.0, k.noise, img.shape), -1.0, 1.0).astype(np.float32)
    return img[:, :, None]


def expression(problem: arithmetic.Problem) -> str:
    """The problem's expression as drawn and read, e.g. "23+45*03" (the question line without "Q " and newline)."""
    return arithmetic.format_prompt(problem)[2:].rstrip("\n")


def answer_text(problem: arithmetic.Problem) -> str:
    """The chain's answer as written in the arithmetic task (zero-padded to the modulus' width)."""
    return str(problem.answer).zfill(problem.width)


class VLMTokenizer:
    """The printable-text tokenizer plus one image placeholder id (IMAGE_TOKEN_ID), which decodes to nothing."""

    name = "text+image"
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
    vocab_size = TEXT_VOCAB_SIZE + 1
    image_token_id = IMAGE_TOKEN_ID

    def encode(self, text: str) -> np.ndarray:
        return TEXT_TOKENIZER.encode(text)

    def decode(self, ids) -> str:
        arr = np.asarray(ids)
        return TEXT_TOKENIZER.decode(np.where(arr >= TEXT_VOCAB_SIZE, PAD_ID, arr))

    def decode_batch(self, ids) -> list[str]:
        return [self.decode(row) for row in np.asarray(ids)]


VLM_TOKENIZER = VLMTokenizer()


@dataclasses.dataclass(frozen=True)
class VLMTask:
    """What a VLM example is: the arithmetic knobs, the rendering, the prompt mode and the image-token count."""

    num_image_tokens: int
    mode: str = "read"
    knobs: arithmetic.Knobs = dataclasses.field(default_factory=lambda: arithmetic.make_knobs(num_steps=(1, 2)))
    render: RenderKnobs = dataclasses.field(default_factory=RenderKnobs)
    text: bool = False  # the expression as text instead of an image (LM pretraining)
    layout: str = "prompt"  # with `text`: "prompt" appends it to the prompt, "grid" writes the image's cells as tokens
    answer: str = "value"  # what "compute" completes: the value alone, or the step-by-step trace ending "A <value>"
    read_every: int = 2  # "mixed": row i reads when i % read_every == 0, else computes

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"task.mode={self.mode!r}; expected one of {MODES}")
        if self.answer not in ANSWERS:
            raise ValueError(f"task.answer={self.answer!r}; expected one of {ANSWERS}")
        if isinstance(self.read_every, bool) or not isinstance(self.read_every, int) or self.read_every < 1:
            raise ValueError(f"task.read_every={self.read_every!r}; expected an int >= 1")
        if self.layout not in LAYOUTS:
            raise ValueError(f"task.layout={self.layout!r}; expected one of {LAYOUTS}")
        if isinstance(self.knobs, Mapping):
            object.__setattr__(self, "knobs", arithmetic.make_knobs(**self.knobs))
        if isinstance(self.render, Mapping):
            object.__setattr__(self, "render", RenderKnobs(**self.render))
        k = self.knobs
        longest = len(expression(arithmetic.Problem(0, ("+",) * k.steps_range[1], (0,) * k.steps_range[1], k.modulus)))
        r = self.render
        if self.layout == "grid" and (
            not r.cell or (r.height // r.cell) * (r.width // r.cell) != self.num_image_tokens
        ):
            raise ValueError(
                f"task.layout='grid' writes one token per image token: render.cell={r.cell} must tile the "
                f"{r.height}x{r.width} image into num_image_tokens={self.num_image_tokens} cells (the ViT's patches)"
            )
        if (not self.text or self.layout == "grid") and longest > self.render.max_chars(self.render.scale[0]):
            raise ValueError(
                f"task: expressions of up to {longest} characters (num_steps up to {k.steps_range[1]}, modulus "
                f"{k.modulus}) do not fit a {self.render.width} px wide image at scale {self.render.scale[0]}"
            )

    def seq_len(self) -> int:
        """Tokens of the longest row (placeholders, BOS, prompt, completion, EOS)."""
        k = self.knobs
        expr = k.steps_range[1] * (1 + arithmetic.number_width(k.modulus)) + arithmetic.number_width(k.modulus)
        inline = self.text and self.layout == "prompt"
        head = 0 if inline else self.num_image_tokens
        longest = expr if self.answer == "value" else max(expr, arithmetic.solution_length(k.steps_range[1], k.modulus))
        return head + 1 + max(len(p) for p in PROMPTS.values()) + (expr if inline else 0) + longest + 1

    def example(self, stream_seed: int, index: int) -> dict[str, Any]:
        """Example `index`: the problem, its image (None with `text`), the prompt and the completion."""
        problem = self.knobs.problem_at(stream_seed, index)
        mode = self.mode if self.mode != "mixed" else ("compute", "read")[index % self.read_every == 0]
        expr = expression(problem)
        prompt = PROMPTS[mode] + (expr if self.text and self.layout == "prompt" else "")
        image = None if self.text else render_expression(expr, seed=index, knobs=self.render)
        grid = cell_text(expr, seed=index, knobs=self.render) if self.text and self.layout == "grid" else None
        if mode == "read":
            completion = expr
        else:
            completion = answer_text(problem) if self.answer == "value" else arithmetic.format_solution(problem)
        return dict(problem=problem, image=image, prompt=prompt, completion=completion, mode=mode, grid=grid)

    def prompt_ids(self, prompt: str, grid: str | None = None) -> np.ndarray:
        """The generation prompt: placeholders (or, for a "grid" text row, the cells' characters `grid`), BOS, the
        prompt's ids."""
        if self.text and self.layout == "grid":
            if grid is None or len(grid) != self.num_image_tokens:
                raise ValueError(f"prompt_ids: a grid text row needs {self.num_image_tokens} cell characters")
            head = TEXT_TOKENIZER.encode(grid).tolist()
        else:
            head = [] if self.text else [IMAGE_TOKEN_ID] * self.num_image_tokens
        return np.asarray(head + [BOS_ID] + TEXT_TOKENIZER.encode(prompt).tolist(), np.int32)


def encode_row(task: VLMTask, ex: Mapping[str, Any], seq_len: int) -> dict[str, np.ndarray]:
    """One padded row: image [H, W, 1], tokens [T], loss_mask [T], prefix_len [], num_steps []."""
    prompt = task.prompt_ids(ex["prompt"], ex.get("grid"))
    full = np.concatenate([prompt, TEXT_TOKENIZER.encode(ex["completion"]), [EOS_ID]]).astype(np.int32)
    if full.size > seq_len:
        raise ValueError(f"VLM example is {full.size} tokens but seq_len = {seq_len}; raise seq_len")
    tokens = np.full(seq_len, PAD_ID, np.int32)
    tokens[: full.size] = full
    mask = np.zeros(seq_len, np.float32)
    mask[prompt.size : full.size] = 1.0
    r = task.render
    image = ex["image"] if ex["image"] is not None else np.full((r.height, r.width, 1), -1.0, np.float32)
    return {
        "images": image,
        "tokens": tokens,
        "loss_mask": mask,
        "prefix_len": np.int32(prompt.size),
        "num_steps": np.int32(ex["problem"].num_steps),
    }


def _row_at(index: int, *, task: VLMTask, stream_seed: int, seq_len: int) -> dict[str, np.ndarray]:
    return encode_row(task, task.example(stream_seed, int(index)), seq_len)


def _stack(rows):
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    check_token_ids(batch["tokens"], VLM_TOKENIZER.vocab_size, where="VLM data batch")
    return batch


def make_vlm_dataset(
    task: VLMTask, *, seed: int, batch_size: int, seq_len: int | None = None, split: str = "train", num_batches=None
) -> grain.MapDataset:
    """A grain MapDataset whose element i is batch i of the task's seeded stream for `split` (step-indexed)."""
    seq_len = task.seq_len() if seq_len is None else int(seq_len)
    if num_batches is None:
        num_batches = sys.maxsize // batch_size
    row = functools.partial(_row_at, task=task, stream_seed=split_seed(seed, split), seq_len=seq_len)
    return (
        grain.MapDataset.range(int(num_batches) * batch_size)
        .map(row)
        .batch(batch_size, drop_remainder=True, batch_fn=_stack)
    )
