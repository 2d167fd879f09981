"""Train the built-in model (`builtin:tiny`): a small LLaVA-1.5 that answers the shapes task.

    python -m scripts.train_builtin --out assets/models/tiny

Seeded end to end (scenes, init, batches); runs on the CPU. Two phases:

1. vision: the CLIP tower + projector alone, with linear probe heads on the projected patch
   features (what the language model reads), trained on per-patch scene labels: the colour of
   the shape under the patch (or background), its kind and its rank from the left (on shape
   patches only), and the number of shapes. No language model over 576 tokens, so steps are
   cheap, and the features the LM gets are already grounded.
2. joint: the whole LlavaForConditionalGeneration on "USER: <image>\\n{question} ASSISTANT:
   {answer}</s>" (loss on the answer tokens only, every question type of each scene in the same
   batch so the vision tower runs once per scene), probe losses kept at a lower weight.

The result is written with `save_pretrained` (fp32) plus the tokenizer and image-processor files,
and is scored with transformers' own `generate` on fresh scenes; the model card (README.md)
records the command, seed, time, weights' sha256 and the accuracy per question type.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from llava_pipeline.base.files import write_json
from llava_pipeline.base.machine import isa_flags, machine
from llava_pipeline.formats import shapes
from llava_pipeline.model.processor_files import TINY_TOKENIZER_MODEL, write_processor_files
from llava_pipeline.model.tiny import tiny_llava_config

IMAGE_ID, EOS_ID, PAD_ID = 32000, 2, 32001
N_PATCH = 576
GRID = 24
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions. "
)


def model_config() -> LlavaConfig:
    """The random tiny model's geometry and depths (so the export's graphs are no larger than
    before) at twice its widths: vision 128 (MLP 256), text 128 (MLP 384)."""
    return tiny_llava_config(vision_hidden=128, vision_mlp=256, text_hidden=128, text_mlp=384)


# ----------------------------------------------------------------------------- data


def to_pixels(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (x - MEAN) / STD


def scene_image(scene: shapes.Scene, rng: random.Random) -> Image.Image:
    """Mostly native 336 px; a quarter drawn at 2-3x and scaled down as the HF processor does."""
    scale = 1 if rng.random() < 0.75 else rng.choice((2, 3))
    img = shapes.render(scene, scale)
    return img if scale == 1 else img.resize((shapes.SIZE, shapes.SIZE), Image.Resampling.BICUBIC)


def patch_labels(scene: shapes.Scene) -> dict[str, torch.Tensor]:
    """Per-patch targets (576 each). `color`: the colour of the shape covering most of the patch
    (0 = background). `kind`: only on patches a shape's edge crosses (-100 elsewhere), where the
    edge itself shows the kind (straight, slanted or curved); a patch inside a shape shows
    nothing of it. `rank` (from the left) on every patch of a shape; `count` on every patch."""
    order = scene.left_to_right()
    # Each shape drawn with its rank from the left as its "colour": an index map.
    index_scene = shapes.Scene(
        (0, 0, 0), tuple(shapes.Shape(s.kind, s.color, (i + 1,) * 3, s.x0, s.y0, s.side) for i, s in enumerate(order))
    )
    index = np.asarray(shapes.render(index_scene).convert("L")).astype(np.int64)
    blocks = index.reshape(GRID, 14, GRID, 14).transpose(0, 2, 1, 3).reshape(N_PATCH, 196)
    covered = np.stack([(blocks == i + 1).mean(1) for i in range(len(order))], 1)  # [576, n]
    main = np.where(covered.max(1) > 0.5, covered.argmax(1) + 1, 0)
    edge_of = np.where(((covered > 0.05) & (covered < 0.95)).any(1), covered.argmax(1), -1)
    kinds = np.array([shapes.KINDS.index(s.kind) for s in order])
    colors = np.array([0] + [sorted(shapes.COLORS).index(s.color) + 1 for s in order])
    return {
        "color": torch.from_numpy(colors[main]),
        "edge_kind": torch.from_numpy(np.where(edge_of >= 0, kinds[np.maximum(edge_of, 0)], -100)),
        "kind": torch.from_numpy(np.where(main > 0, kinds[np.maximum(main - 1, 0)], -100)),
        "rank": torch.from_numpy(np.where(main > 0, main - 1, -100)),
        "count": torch.full((N_PATCH,), len(order) - 1),
    }


def sincos_positions(dim: int) -> torch.Tensor:
    """[577, dim] 2-D sine-cosine position embeddings (row 0, the class token, zero): attention
    then starts out able to tell near patches from far ones, and the x coordinate is readable."""
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter) / quarter))
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    x, y = cols.reshape(-1, 1).float() * freqs, rows.reshape(-1, 1).float() * freqs
    table = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table], dim=0)


HEADS = {"kind": 3, "color": 5, "rank": 3, "count": 3}


class Prompts:
    """Token ids as the HF processor (legacy Llama tokenizer) and ExecuTorch's runner make them:
    each text chunk around <image> encoded on its own with SentencePiece's dummy prefix."""

    def __init__(self, sp_model: Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(sp_model))
        self.cache: dict[tuple, list[int]] = {}

    def enc(self, text: str) -> list[int]:
        key = (text,)
        if key not in self.cache:
            self.cache[key] = self.sp.encode(text)
        return self.cache[key]

    def sequence(self, question: str, answer: str, variant: int) -> tuple[list[int], int]:
        """(ids, n_prompt): variant 0 is LLaVA-1.5's prompt; 1 and 2 add llava_main's system
        text before "USER: ", 2 also drops the newline after the image."""
        before = (SYSTEM if variant else "") + "USER: "
        after = ("\n" if variant < 2 else "") + f"{question} ASSISTANT:"
        prompt = [1] + self.enc(before) + [IMAGE_ID] * N_PATCH + self.enc(after)
        return prompt + self.enc(answer) + [EOS_ID], len(prompt)


def scene_items(scene: shapes.Scene, rng: random.Random, keep: dict[str, float] | None) -> list[shapes.Item]:
    """The questions one training scene is asked. Without `keep`: one per type. With it: every
    colour question the scene allows, and each other type with probability `keep[type]` (1 if
    not given), so that training time goes where the answers are still wrong."""
    if keep is None:
        return shapes.one_per_type(scene, rng)
    return [
        item for item in shapes.questions(scene) if item.qtype == "color" or rng.random() < keep.get(item.qtype, 1.0)
    ]


# Box sides per shape count for scenes where the area covered says the wrong count: two or
# three large shapes cover more than three small ones (a model that counts by area gets the
# 2-shape scenes of sides 82-100 wrong as "three", and 3-shape ones of sides 56-64 as "two").
HARD_SIDES = {1: (90, 100), 2: (84, 100), 3: (56, 68)}


def make_batch(
    rng: random.Random,
    prompts: Prompts,
    n_images: int,
    max_shapes: int = 3,
    keep: dict[str, float] | None = None,
    annotate=None,
    shape_weights: list[float] | None = None,
    count_hard: float = 0.0,
):
    """(pixels, per-patch labels, seqs): seqs are (image index, ids, n_prompt, qtype). With
    `annotate(item, ids, n_prompt)`, a fourth element: its result for each sequence.
    `shape_weights`: relative frequency of scenes with 1, 2, 3 shapes (None: equally often), up
    to `max_shapes`. `count_hard`: the share of scenes whose box sides come from HARD_SIDES, where
    the shapes' area says the wrong count."""
    pixels, labels, seqs, notes = [], [], [], []
    for i in range(n_images):
        n = (
            rng.randint(1, max_shapes)
            if shape_weights is None
            else rng.choices(range(1, max_shapes + 1), weights=shape_weights[:max_shapes])[0]
        )
        # Drawn only when asked for, so that a run without it sees the same scenes as before.
        hard = count_hard > 0 and rng.random() < count_hard
        scene = shapes.sample_scene(rng, n, HARD_SIDES[n] if hard else None)
        pixels.append(to_pixels(scene_image(scene, rng)))
        labels.append(patch_labels(scene))
        for item in scene_items(scene, rng, keep):
            r = rng.random()
            variant = 0 if r < 0.7 else (1 if r < 0.85 else 2)
            ids, n_prompt = prompts.sequence(item.question, item.answer, variant)
            seqs.append((i, ids, n_prompt, item.qtype))
            if annotate is not None:
                notes.append(annotate(item, ids, n_prompt))
    lab = {k: torch.stack([d[k] for d in labels]) for k in HEADS}
    batch = (torch.stack(pixels), lab, seqs)
    return batch if annotate is None else batch + (notes,)


# ----------------------------------------------------------------------------- model pieces


def image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """Projected features of CLIP's second-to-last layer, without running the last layer (which
    LLaVA never reads): the same values as `get_image_features`, checked after training."""
    vt = model.model.vision_tower
    hidden = vt.pre_layrnorm(vt.embeddings(pixels))
    for layer in vt.encoder.layers[:-1]:
        hidden = layer(hidden, None)
    return model.model.multi_modal_projector(hidden[:, 1:])


def patch_path(model, pixels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The vision tower + projector on single patches, attention left out: exactly what the
    tower computes for those patches while its attention output projections are zero.
    `pixels` [N, 3, 14, 14], `index` [N] patch positions (0..575)."""
    vt = model.model.vision_tower
    emb = vt.embeddings
    h = emb.patch_embedding(pixels).flatten(1) + emb.position_embedding.weight[index + 1]
    h = vt.pre_layrnorm(h)
    for layer in vt.encoder.layers[:-1]:
        h = h + layer.mlp(layer.layer_norm2(h))
    return model.model.multi_modal_projector(h)


def patch_batch(rng: random.Random, n_images: int):
    """Phase 0's data: the edge patches of `n_images` scenes (drawn at 336 px) and their kinds."""
    pix, idx, kinds = [], [], []
    for _ in range(n_images):
        scene = shapes.sample_scene(rng)
        grid = to_pixels(shapes.render(scene)).reshape(3, GRID, 14, GRID, 14).permute(1, 3, 0, 2, 4)
        edge_kind = patch_labels(scene)["edge_kind"]
        pick = torch.nonzero(edge_kind >= 0).flatten()
        pix.append(grid.reshape(N_PATCH, 3, 14, 14)[pick])
        idx.append(pick)
        kinds.append(edge_kind[pick])
    return torch.cat(pix), torch.cat(idx), torch.cat(kinds)


def probe_loss(heads: torch.nn.ModuleDict, feats: torch.Tensor, labels: dict):
    total: float | torch.Tensor = 0.0
    parts: dict[str, float] = {}
    for name, head in heads.items():
        logits = head(feats)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[name].reshape(-1))
        parts[name] = float(loss.detach())
        total = total + loss
    return total, parts


def answer_inputs(model, feats: torch.Tensor, seqs) -> torch.Tensor:
    """The language model's input embeddings: each sequence right-padded, its <image> rows
    replaced by its image's projected features."""
    width = max(len(ids) for _, ids, _, _ in seqs)
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    for b, (_, s, _, _) in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
    emb = model.get_input_embeddings()(ids)
    img = feats[torch.tensor([i for i, _, _, _ in seqs])]
    return emb.masked_scatter((ids == IMAGE_ID).unsqueeze(-1), img.reshape(-1, img.shape[-1]).to(emb.dtype))


def answer_positions(seqs) -> tuple[list[int], list[int], list[int]]:
    """(sequence, position, next token) of every answer-predicting position, in order."""
    rows, cols, targets = [], [], []
    for b, (_, s, n_prompt, _) in enumerate(seqs):
        for t in range(n_prompt - 1, len(s) - 1):
            rows.append(b)
            cols.append(t)
            targets.append(s[t + 1])
    return rows, cols, targets


def answer_logits(model, feats: torch.Tensor, seqs) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Logits at every answer-predicting position of every sequence, their targets, and the
    sequence each belongs to."""
    hidden = model.model.language_model(inputs_embeds=answer_inputs(model, feats, seqs)).last_hidden_state
    rows, cols, targets = answer_positions(seqs)  # causal: right pad is inert
    return model.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)]), torch.tensor(targets), rows


def per_answer_loss(logits: torch.Tensor, targets: torch.Tensor, owner: list[int], n_seqs: int) -> torch.Tensor:
    """Cross-entropy averaged over each answer's tokens, then over answers: every answer counts
    the same, however many tokens it has."""
    per_token = F.cross_entropy(logits, targets, reduction="none")
    owner_t = torch.tensor(owner)
    sums = torch.zeros(n_seqs).index_add(0, owner_t, per_token)
    counts = torch.zeros(n_seqs).index_add(0, owner_t, torch.ones_like(per_token))
    return (sums / counts).mean()


def exact_by_type(logits, targets, owner, seqs) -> dict[str, list[int]]:
    """Teacher-forced exact answers (every answer token the argmax), per question type."""
    ok = (logits.argmax(-1) == targets).tolist()
    per_seq: dict[int, bool] = {}
    for b, good in zip(owner, ok):
        per_seq[b] = per_seq.get(b, True) and good
    out: dict[str, list[int]] = {}
    for b, (_, _, _, qtype) in enumerate(seqs):
        hits = out.setdefault(qtype, [0, 0])
        hits[0] += per_seq[b]
        hits[1] += 1
    return out


def lr_at(step: int, total: int, peak: float, warmup: int = 40) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- training


def grow_text_layers(model: LlavaForConditionalGeneration, n_layers: int) -> LlavaForConditionalGeneration:
    """The same model with `n_layers` decoder layers: the trained ones first, then new ones whose
    output projections (attention o_proj, MLP down_proj) start at zero, so that each new layer
    adds nothing to the residual stream at first and the grown model computes what the trained
    one did; training then gives the language model depth it can use."""
    cfg = model.config
    assert isinstance(cfg.text_config, LlamaConfig)  # model_config() makes a llama text model
    have = cfg.text_config.num_hidden_layers
    if n_layers <= have:
        raise SystemExit(f"error: --grow-text-layers {n_layers}: the model already has {have} layers")
    cfg.text_config.num_hidden_layers = n_layers
    grown = LlavaForConditionalGeneration(cfg).train()
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".layers." in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        for layer in grown.model.language_model.layers[have:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return grown


def log(msg: str) -> None:
    print(msg, flush=True)


def train(args) -> tuple[LlavaForConditionalGeneration, dict]:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    if args.init is not None:  # continue from an earlier run's checkpoint
        model = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32).train()
        if args.grow_text_layers:
            model = grow_text_layers(model, args.grow_text_layers)
    else:
        model = LlavaForConditionalGeneration(model_config()).train()
        with torch.no_grad():
            pos = model.model.vision_tower.embeddings.position_embedding.weight
            pos.copy_(0.5 * sincos_positions(pos.shape[1]))
    dim = model.config.text_config.hidden_size
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, n) for k, n in HEADS.items()})
    prompts = Prompts(TINY_TOKENIZER_MODEL)
    vision = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    stats: dict = {}

    # Phase 0: the tower's per-patch path alone (attention off) on what an edge patch shows.
    t0 = time.time()
    opt = torch.optim.Adam(vision + list(heads["kind"].parameters()), lr=args.lr_patch)
    for step in range(args.patch_steps):
        pix, idx, kinds = patch_batch(rng, args.patch_batch)
        loss = F.cross_entropy(heads["kind"](patch_path(model, pix, idx)), kinds)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.patch_steps - 1:
            log(f"patch {step:4d} edge_kind={float(loss):.3f} ({time.time() - t0:.0f} s)")
    stats["patch_minutes"] = round((time.time() - t0) / 60, 1)
    # Attention joins in from zero, so the tower starts out computing what phase 0 taught it.
    if args.patch_steps:
        with torch.no_grad():
            for layer in model.model.vision_tower.encoder.layers:
                layer.self_attn.out_proj.weight.zero_()
                layer.self_attn.out_proj.bias.zero_()

    # Phase 1: vision tower + projector on per-patch labels.
    t0 = time.time()
    opt = torch.optim.AdamW(vision + list(heads.parameters()), lr=args.lr_vision, weight_decay=0.01)
    for step in range(args.vision_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vision_steps, args.lr_vision)
        pixels, labels, _ = make_batch(rng, prompts, args.vision_batch)
        loss, parts = probe_loss(heads, image_features(model, pixels), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == args.vision_steps - 1:
            log(
                f"vision {step:4d} loss {float(loss):.3f} "
                + " ".join(f"{k}={v:.2f}" for k, v in parts.items())
                + f" ({time.time() - t0:.0f} s)"
            )
    stats["vision_minutes"] = round((time.time() - t0) / 60, 1)

    # Phase 2: everything, answer tokens + probes.
    t0 = time.time()
    lm = [
        p
        for n, p in model.named_parameters()
        if not n.startswith(("model.vision_tower", "model.multi_modal_projector"))
    ]
    groups = [
        {"params": vision, "peak": args.lr_vision * args.joint_vision_lr_scale},
        {"params": list(heads.parameters()), "peak": args.lr_vision * args.joint_vision_lr_scale},
        {"params": lm, "peak": args.lr_lm},
    ]
    opt = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=args.lr_lm, weight_decay=0.0)
    val_rng = random.Random(args.seed + 1)
    val = [make_batch(val_rng, prompts, 16) for _ in range(2)]
    for step in range(args.joint_steps):
        for g, spec in zip(opt.param_groups, groups):
            g["lr"] = lr_at(step, args.joint_steps, spec["peak"])
        # Curriculum: one or two shapes for the first steps, then the whole grammar.
        max_shapes = 2 if step < int(args.joint_steps * args.curriculum) else 3
        pixels, labels, seqs = make_batch(rng, prompts, args.joint_batch, max_shapes, args.keep)
        feats = image_features(model, pixels)
        logits, targets, owner = answer_logits(model, feats, seqs)
        if args.loss_per == "sequence":
            lm_loss = per_answer_loss(logits, targets, owner, len(seqs))
        else:
            lm_loss = F.cross_entropy(logits, targets)
        aux, _ = probe_loss(heads, feats, labels)
        loss = lm_loss + args.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == args.joint_steps - 1:
            msg = f"joint {step:4d} lm {float(lm_loss):.4f} aux {float(aux):.3f} ({time.time() - t0:.0f} s)"
            if step % 100 == 0 or step == args.joint_steps - 1:
                msg += " val " + validate(model, val)
            log(msg)
    stats["joint_minutes"] = round((time.time() - t0) / 60, 1)
    return model.eval(), stats


@torch.no_grad()
def validate(model, batches) -> str:
    was = model.training
    model.eval()
    total: dict[str, list[int]] = {}
    for pixels, _, seqs in batches:
        logits, targets, owner = answer_logits(model, image_features(model, pixels), seqs)
        for k, (a, n) in exact_by_type(logits, targets, owner, seqs).items():
            total.setdefault(k, [0, 0])
            total[k][0] += a
            total[k][1] += n
    model.train(was)
    return " ".join(f"{k}={a}/{n}" for k, (a, n) in sorted(total.items()))


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_with_hf(folder: Path, n_scenes: int, seed: int, scale: int = 1) -> dict[str, list[int]]:
    """Exact answers of transformers' greedy `generate` on fresh scenes, via the saved
    processor, per question type."""
    from transformers import AutoProcessor

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    hits: dict[str, list[int]] = {}
    for item in shapes.eval_items(n_scenes, seed):
        prompt = f"USER: <image>\n{item.question} ASSISTANT:"
        inputs = processor(text=prompt, images=shapes.render(item.scene, scale), return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        h = hits.setdefault(item.qtype, [0, 0])
        h[0] += text == item.answer
        h[1] += 1
    return hits


CARD = """# builtin:tiny: a small LLaVA-1.5 trained on the shapes task

The pipeline's default model (`model=tiny`, `model.source=builtin:tiny`). HF format, as
`LlavaForConditionalGeneration.save_pretrained` writes it (fp32 safetensors), with the tokenizer and
image-processor files of llava-hf/llava-1.5-7b-hf's layout.

## Architecture
LLaVA-1.5's geometry and formats at small widths: CLIP-style vision tower (336 px, patch 14, 576
image tokens, hidden {vision_hidden}, {vision_layers} layers of which LLaVA runs all but the last:
feature layer -2), the 2-layer GELU MLP projector, a Llama decoder (hidden {text_hidden},
{text_layers} layers, {heads} heads, {kv_heads} KV heads, MLP {mlp}), the real Llama-2 SentencePiece
vocabulary plus `<image>` (32000) and `<pad>` (32001), model vocab 32064, untied lm_head.
{params:.2f} M parameters, of which {embed:.2f} M in the embedding and lm_head.

## Task and data
Synthetic, generated on the fly by `llava_pipeline/formats/shapes.py` (its docstring is the grammar): 336x336
scenes on a light uniform background with 1-3 filled circles, squares and triangles in red, green,
blue or yellow (each channel jittered by up to 20), boxes 56-100 px, 8 px apart and from the edges,
centres 24 px apart in x; a quarter of the training scenes are drawn at 2-3x and scaled down as the
HF processor does. Prompt `USER: <image>\\n{{question}} ASSISTANT:` (30% of the training prompts also
carry llava_main's system text before `USER: `), answers ending in `</s>`:

- "How many shapes are there?" -> one | two | three
- "What color is the {{shape}}?" (only when exactly one shape is of that kind) -> red | green | blue | yellow
- "What shape is on the left?" -> circle | square | triangle (smallest centre x)
- "Describe the picture." -> "a red circle, a blue square and a green triangle" (left to right)

## Training
{training}

Phase 0, {patch_steps} steps ({patch_minutes} min): the vision tower's per-patch path alone on the
kind of shape whose edge crosses a patch. Phase 1, {vision_steps} steps ({vision_minutes} min): the
tower with attention (its output projections starting at zero) and the projector, with linear probes
on the projected patch features (colour, kind, rank from the left, shape count). Phase 2,
{joint_steps} steps ({joint_minutes} min): the whole model on the answers (cross-entropy on the
answer tokens, each answer weighing the same), probes kept at weight {aux_weight}.{attention}{kind} AdamW,
warm-up then cosine decay; see the scripts' arguments for every learning rate.

## Accuracy
Exact answers of transformers' greedy `generate` (fp32, these weights), {n_scenes} fresh scenes
(seed {eval_seed}) x one question of each type:

| question | exact | 672 px scenes ({n_big}, scaled down by the processor) |
|---|---|---|
{rows}

Weights: `model.safetensors`, sha256 `{sha}`. `training.json` holds these figures and the arguments.
"""


ATTENTION_TEXT = """ Phase 3, {attention_steps}
steps ({attention_minutes} min, scripts/train_attention.py): phase 2 plus a loss on where the last
decoder layer's first head looks at each answer token that names a shape's colour or kind (-log
of its attention mass on that shape's image patches){value}."""

VALUE_TEXT = """, and a linear probe on what that head writes there, which must
name the shape's colour and kind (weight {value_weight})"""


KIND_TEXT = """ From run {first} on, a loss on the first decoder layer too: at the
position that predicts a colour answer, one head's attention on the question's shape word (-log of
it; weight {kind_weight}){slot}."""

SLOT_TEXT = """; in runs with `--slot-weight` ({first}), also that head's attention in descriptions, spread evenly over the
prompt's last token and the answer's "a" words so far (cross-entropy; weight {slot_weight})"""


COUNT_TEXT = """ In runs with `--count-hard` ({runs}), a share of the training scenes
({shares}) is drawn at sizes where the area the shapes cover says the wrong count: two shapes of
side {two} px, three of {three} px."""


PHASES = ("patch", "vision", "joint", "attention")


def _run_entry(stats: dict) -> dict:
    """What the card says of one training run: its command, seed, time and steps per phase."""
    entry = {
        "command": stats["command"],
        "seed": stats["args"]["seed"],
        "train_minutes": stats["train_minutes"],
        "aux_weight": stats["args"]["aux_weight"],
        "value_weight": stats["args"].get("value_weight", 0.0),
        "kind_weight": stats["args"].get("kind_weight", 0.0),
        "slot_weight": stats["args"].get("slot_weight", 0.0),
        "count_hard": stats["args"].get("count_hard", 0.0),
        "machine": stats.get("machine"),
    }
    for phase in PHASES:
        entry[f"{phase}_steps"] = stats["args"].get(f"{phase}_steps", 0)
        entry[f"{phase}_minutes"] = stats.get(f"{phase}_minutes", 0.0)
    return entry


def _where(run: dict) -> str:
    m = run.get("machine")
    if not m:
        return "machine not recorded"
    return f"{m['threads']} threads, {m['cpu']}, ISA: {', '.join(m['isa']) or 'not recorded'}"


def _training_text(stats: dict) -> str:
    runs = stats.get("runs", [_run_entry(stats)])
    if len(runs) == 1:
        return (
            f"`{runs[0]['command']}` (seed {runs[0]['seed']}, {_where(runs[0])}): "
            f"{runs[0]['train_minutes']} min in all."
        )
    lines = [f"{len(runs)} runs in this order, each starting from the previous one's output:", ""]
    lines += [
        f"{i}. `{r['command']}` (seed {r['seed']}; {_where(r)}): {r['train_minutes']} min"
        for i, r in enumerate(runs, 1)
    ]
    return "\n".join(lines) + f"\n\n{sum(r['train_minutes'] for r in runs):.1f} min in all."


def _runs_with(runs: list[dict], key: str) -> list[tuple[int, float]]:
    """(run number from 1, value) of the runs whose `key` was set."""
    return [(i, r[key]) for i, r in enumerate(runs, 1) if r.get(key)]


def _kind_text(runs: list[dict]) -> str:
    """The card's words on the first-layer attention losses, for the runs that had them."""
    kind = _runs_with(runs, "kind_weight")
    if not kind:
        return ""
    slot = _runs_with(runs, "slot_weight")
    return KIND_TEXT.format(
        first=kind[0][0],
        kind_weight=", then ".join(str(w) for _, w in kind),
        slot=SLOT_TEXT.format(
            first=", ".join(str(i) for i, _ in slot), slot_weight=", then ".join(str(w) for _, w in slot)
        )
        if slot
        else "",
    )


def _count_text(runs: list[dict]) -> str:
    """The card's words on the count-hard scenes, for the runs that had them."""
    hard = _runs_with(runs, "count_hard")
    if not hard:
        return ""
    return COUNT_TEXT.format(
        runs=", ".join(str(i) for i, _ in hard),
        shares=", then ".join(str(p) for _, p in hard),
        two="-".join(map(str, HARD_SIDES[2])),
        three="-".join(map(str, HARD_SIDES[3])),
    )


def write_card(folder: Path, model, stats: dict) -> None:
    cfg = model.config
    v, t = cfg.vision_config, cfg.text_config
    params = sum(p.numel() for p in model.parameters()) / 1e6
    embed = (model.get_input_embeddings().weight.numel() + model.lm_head.weight.numel()) / 1e6
    rows = "\n".join(
        f"| {q} | {a[0]}/{a[1]} ({a[0] / a[1]:.1%}) | {b[0]}/{b[1]} ({b[0] / b[1]:.1%}) |"
        for q in shapes.QUESTION_TYPES
        for a, b in [(stats["accuracy"][q], stats["accuracy_672px"][q])]
    )
    args = stats["args"]
    runs = stats.get("runs", [_run_entry(stats)])
    value_weights = [r["value_weight"] for r in runs if r.get("value_weight")]
    total = {
        f"{ph}_{what}": round(sum(r.get(f"{ph}_{what}", 0) for r in runs), 1)
        for ph in PHASES
        for what in ("steps", "minutes")
    }
    total = {k: int(v) if k.endswith("steps") else v for k, v in total.items()}
    (folder / "README.md").write_text(
        CARD.format(
            vision_hidden=v.hidden_size,
            vision_layers=v.num_hidden_layers,
            text_hidden=t.hidden_size,
            text_layers=t.num_hidden_layers,
            heads=t.num_attention_heads,
            kv_heads=t.num_key_value_heads,
            mlp=t.intermediate_size,
            params=params,
            embed=embed,
            training=_training_text(stats),
            **total,
            aux_weight=", then ".join(str(r["aux_weight"]) for r in runs if r["joint_steps"]),
            n_scenes=args["eval_scenes"],
            eval_seed=10_000 + args["seed"],
            n_big=args["eval_scenes"] // 3,
            attention=ATTENTION_TEXT.format(
                **total,
                value=VALUE_TEXT.format(value_weight=", then ".join(str(w) for w in value_weights))
                if value_weights
                else "",
            )
            if total["attention_steps"]
            else "",
            kind=_kind_text(runs) + _count_text(runs),
            rows=rows,
            sha=stats["weights_sha256"],
        )
    )


def finish(model, stats: dict, args, t_start: float) -> None:
    """Check, save, score and describe a trained model: `args.out` gets the HF folder,
    training.json (stats, args, the chain of runs) and the model card. `stats` holds the
    run's command and minutes per phase."""
    # Same values as LLaVA's own feature path (all layers, hidden_states[-2]).
    check = to_pixels(shapes.render(shapes.sample_scene(random.Random(7)))).unsqueeze(0)
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=check).pooler_output
        ref = ref if isinstance(ref, torch.Tensor) else torch.cat(list(ref))
        assert torch.allclose(image_features(model, check).reshape(ref.shape), ref, atol=1e-5)

    partial = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save_pretrained(partial)
    write_processor_files(partial, model.config)
    stats["train_minutes"] = round((time.time() - t_start) / 60, 1)
    stats["machine"] = {"cpu": machine()["cpu"], "isa": isa_flags(), "threads": torch.get_num_threads()}
    t0 = time.time()
    stats["accuracy"] = score_with_hf(partial, args.eval_scenes, seed=10_000 + args.seed)
    stats["accuracy_672px"] = score_with_hf(partial, args.eval_scenes // 3, seed=20_000 + args.seed, scale=2)
    stats["score_minutes"] = round((time.time() - t0) / 60, 1)
    stats["weights_sha256"] = hashlib.sha256((partial / "model.safetensors").read_bytes()).hexdigest()
    stats["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.init is not None and (args.init / "training.json").exists():
        # A continuation: the card lists the runs in order (each one's command, time and seed).
        earlier = json.loads((args.init / "training.json").read_text())
        stats["runs"] = earlier.get("runs", [_run_entry(earlier)]) + [_run_entry(stats)]
    write_json(partial / "training.json", stats)
    write_card(partial, model, stats)
    log(json.dumps(stats, indent=2, sort_keys=True))
    shutil.rmtree(args.out, ignore_errors=True)
    partial.rename(args.out)


def _shape_weights(text: str) -> list[float]:
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        raise argparse.ArgumentTypeError(f"--shape-weights: expected three weights >= 0 (1, 2, 3 shapes), got {text!r}")
    return weights


def _keep(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        qtype, _, p = part.partition("=")
        if qtype not in shapes.QUESTION_TYPES or qtype == "color":
            raise argparse.ArgumentTypeError(f"--keep: {qtype!r} is not one of count, left, describe")
        out[qtype] = float(p)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--patch-steps", type=int, default=1000)
    ap.add_argument("--patch-batch", type=int, default=8, help="scenes per phase-0 step")
    ap.add_argument("--lr-patch", type=float, default=1e-3)
    ap.add_argument("--vision-steps", type=int, default=200)
    ap.add_argument("--vision-batch", type=int, default=24)
    ap.add_argument("--joint-steps", type=int, default=400)
    ap.add_argument("--joint-batch", type=int, default=8, help="scenes per step (x ~4 questions)")
    ap.add_argument("--lr-vision", type=float, default=1e-3)
    ap.add_argument("--joint-vision-lr-scale", type=float, default=0.25)
    ap.add_argument("--lr-lm", type=float, default=3e-3)
    ap.add_argument("--aux-weight", type=float, default=0.3)
    ap.add_argument("--eval-scenes", type=int, default=150)
    ap.add_argument("--init", type=Path, default=None, help="continue from this checkpoint folder")
    ap.add_argument("--loss-per", choices=("token", "sequence"), default="sequence")
    ap.add_argument("--curriculum", type=float, default=0.1, help="share of joint steps with at most 2 shapes")
    ap.add_argument(
        "--grow-text-layers",
        type=int,
        default=0,
        metavar="N",
        help="with --init: append decoder layers up to N, each starting as the identity",
    )
    ap.add_argument(
        "--keep",
        type=_keep,
        default=None,
        metavar="TYPE=P,...",
        help="ask every colour question of a scene, and each other type with probability P "
        "(e.g. count=0.5,left=0.5); default: one question per type",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    model, stats = train(args)

    stats["command"] = "python -m scripts.train_builtin " + " ".join(argv if argv is not None else sys.argv[1:])
    finish(model, stats, args, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
