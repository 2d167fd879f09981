"""Continue training the built-in model with attention supervision (phase 3 of its card).

    python -m scripts.train_attention --init FOLDER --out FOLDER [--attention-steps 500 ...]

Phase 2 of scripts/train_builtin.py (answer tokens + probe losses) plus one more loss: at every
answer token that names a shape's colour or kind, the attention of the last decoder layer's first
head should fall on that shape's image patches (patches more than half covered by it). The loss is
-log of that attention mass. Colour questions point at the asked shape, "left" at the leftmost one,
and in "Describe the picture." each "a {colour} {kind}" at the shape of its rank from the left.

Why: trained on the answers alone, the model answered "What color is the {shape}?" with the colour
of some shape in the scene, not of the one asked about (its misses all named another shape's
colour); the binding of the question's shape word to the picture's patches did not form, though
the vision features encode each patch's kind and rank (linear probes). The target is the
model's own attention, so nothing of this loss is in the exported graph.

Measured, on 150 fresh scenes (count, colour, left, describe). From the output of
`scripts.train_builtin --init assets/models/tiny --seed 4 --patch-steps 0 --vision-steps 1200
--joint-steps 600 --aux-weight 0.3`: `--attention-steps 500 --keep count=0.5,left=0.5` (27 min, 2
threads, AVX-512) brought the loss from 3.47 to 0.3-0.5 (about 0.65 of the head's attention on
the right shape), but colour stayed at 88/126 (count 146, left 147, describe 65/150): the head
found the shape, the answer was not read from it (zeroing that head's output changed 1 of 60
colour answers). The same run with `--attention-steps 400 --value-weight 0.5` (a linear probe
on what the head writes must name the shape's colour and kind; 13 min) moved colour to 95/126
and describe to 68/150. The committed model (its card's run 4) is `--attention-steps 800
--value-weight 0.5 --keep count=0.5,left=0.5` from a run with 1500 vision-probe steps and 400
joint steps (25 min): count 147, colour 92/127, left 149, describe 116/150 (77%, from 41%
before this phase). Colour is still far from the task's 95%.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration

from llava_pipeline import shapes
from scripts import train_builtin as tb

A_ID, COMMA_ID, AND_ID = 263, 29892, 322  # "▁a", ",", "▁and" in the Llama-2 vocabulary


def slots_for(item: shapes.Item, ids: list[int], n_prompt: int) -> list[int]:
    """Per answer-predicting position: the rank from the left of the shape the predicted token
    names (its colour or kind), or -1 where the token names none (count words, "a", ",", "and",
    "</s>")."""
    order = item.scene.left_to_right()
    rank = 0
    if item.qtype == "color":
        asked = re.fullmatch(r"What color is the (\w+)\?", item.question)
        assert asked, item.question  # shapes.color_question's wording
        kind = asked.group(1)
        rank = next(i for i, s in enumerate(order) if s.kind == kind)
    out, slot = [], -1
    for t in range(n_prompt - 1, len(ids) - 1):
        nxt = ids[t + 1]
        if item.qtype == "count" or nxt == tb.EOS_ID:
            out.append(-1)
        elif item.qtype in ("color", "left"):
            out.append(rank)
        elif nxt == A_ID:
            slot += 1
            out.append(-1)
        else:
            out.append(-1 if nxt in (COMMA_ID, AND_ID) else slot)
    return out


def forward(model, feats: torch.Tensor, seqs, slots, rank: torch.Tensor):
    """train_builtin.answer_logits plus the attention loss and, at the supervised positions,
    what head 0 writes (its input to o_proj): (out [N, head_dim], image index [N], rank [N]),
    or None where no position is supervised."""
    captured: dict[str, torch.Tensor] = {}
    attn = model.model.language_model.layers[-1].self_attn
    hook = attn.o_proj.register_forward_pre_hook(lambda mod, inp: captured.__setitem__("x", inp[0]))
    out = model.model.language_model(inputs_embeds=tb.answer_inputs(model, feats, seqs), output_attentions=True)
    hook.remove()
    rows, cols, targets = tb.answer_positions(seqs)
    logits = model.lm_head(out.last_hidden_state[torch.tensor(rows), torch.tensor(cols)])
    # The positions whose predicted token names a shape, with that shape's rank.
    flat_slots = [r for per_seq in slots for r in per_seq]
    picked = [(b, t, r) for b, t, r in zip(rows, cols, flat_slots) if r >= 0]
    if not picked:
        return logits, torch.tensor(targets), rows, torch.zeros(()), None
    sr, sc, sranks = (torch.tensor(v) for v in zip(*picked))
    owner_img = torch.tensor([i for i, _, _, _ in seqs])[sr]
    start = torch.tensor([seqs[b][1].index(tb.IMAGE_ID) for b in sr.tolist()])
    att = out.attentions[-1][:, 0]  # last layer, head 0: [B, T, T]
    a_img = att[sr, sc].gather(1, start[:, None] + torch.arange(tb.N_PATCH))
    att_loss = -((a_img * (rank[owner_img] == sranks[:, None])).sum(-1) + 1e-4).log().mean()
    head_out = captured["x"][sr, sc, : attn.head_dim]
    return logits, torch.tensor(targets), rows, att_loss, (head_out, owner_img, sranks)


def shape_targets(labels: dict, img_of: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The colour (1-4) and kind (0-2) of the shape of rank `ranks` in image `img_of`, read off
    the per-patch labels (any patch of that rank carries them)."""
    colours, kinds = [], []
    for i, r in zip(img_of.tolist(), ranks.tolist()):
        patch = int(torch.nonzero(labels["rank"][i] == r)[0])
        colours.append(int(labels["color"][i, patch]))
        kinds.append(int(labels["kind"][i, patch]))
    return torch.tensor(colours), torch.tensor(kinds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", type=Path, required=True, help="the checkpoint folder to continue from")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--attention-steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="scenes per step")
    ap.add_argument("--lr-lm", type=float, default=3e-3)
    ap.add_argument("--lr-vision", type=float, default=2.5e-4)
    ap.add_argument("--att-weight", type=float, default=0.5)
    ap.add_argument("--aux-weight", type=float, default=0.3)
    ap.add_argument(
        "--value-weight",
        type=float,
        default=0.0,
        help="weight of a linear probe on what head 0 writes (the named shape's colour and kind)",
    )
    ap.add_argument("--keep", type=tb._keep, default=None, metavar="TYPE=P,...", help="as train_builtin's")
    ap.add_argument(
        "--shape-weights",
        type=tb._shape_weights,
        default=None,
        metavar="W1,W2,W3",
        help="relative frequency of training scenes with 1, 2, 3 shapes (default: equal)",
    )
    ap.add_argument("--eval-scenes", type=int, default=150)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t_start = time.time()
    model = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32).train()
    model.set_attn_implementation("eager")  # the only one that returns attention weights
    prompts = tb.Prompts(tb.TINY_TOKENIZER_MODEL)
    heads = torch.nn.ModuleDict(
        {k: torch.nn.Linear(model.config.text_config.hidden_size, n) for k, n in tb.HEADS.items()}
    )
    vision = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    lm = [
        p
        for n, p in model.named_parameters()
        if not n.startswith(("model.vision_tower", "model.multi_modal_projector"))
    ]
    # Made only when asked for, so that a run without them draws the same random numbers as before.
    head_dim = model.model.language_model.layers[-1].self_attn.head_dim
    value_heads = torch.nn.ModuleDict(
        {"color": torch.nn.Linear(head_dim, 5), "kind": torch.nn.Linear(head_dim, 3)} if args.value_weight else {}
    )
    groups = [
        (vision, args.lr_vision),
        (list(heads.parameters()) + list(value_heads.parameters()), 1e-3),
        (lm, args.lr_lm),
    ]
    opt = torch.optim.AdamW([{"params": p} for p, _ in groups], weight_decay=0.0)
    t0 = time.time()
    for step in range(args.attention_steps):
        for g, (_, peak) in zip(opt.param_groups, groups):
            g["lr"] = tb.lr_at(step, args.attention_steps, peak)
        pixels, labels, seqs, slots = tb.make_batch(
            rng, prompts, args.batch, keep=args.keep, annotate=slots_for, shape_weights=args.shape_weights
        )
        feats = tb.image_features(model, pixels)
        logits, targets, owner, att_loss, picked = forward(model, feats, seqs, slots, labels["rank"])
        value_loss = torch.zeros(())
        if picked is not None and args.value_weight:
            # What head 0 writes at those positions should name the shape's colour and kind.
            out_h, img_of, ranks = picked
            colour_t, kind_t = shape_targets(labels, img_of, ranks)
            value_loss = F.cross_entropy(value_heads["color"](out_h), colour_t) + F.cross_entropy(
                value_heads["kind"](out_h), kind_t
            )
        lm_loss = tb.per_answer_loss(logits, targets, owner, len(seqs))
        # The fresh probe heads first fit the features as they are, then keep them in place.
        aux, _ = tb.probe_loss(heads, feats if step >= 60 else feats.detach(), labels)
        loss = lm_loss + args.att_weight * att_loss + args.aux_weight * aux + args.value_weight * value_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == args.attention_steps - 1:
            tb.log(
                f"step {step} lm {float(lm_loss):.4f} att {float(att_loss):.3f} value {float(value_loss):.3f} "
                f"aux {float(aux):.3f} ({time.time() - t0:.0f} s)"
            )
    model.set_attn_implementation("sdpa")
    stats = {
        "attention_minutes": round((time.time() - t0) / 60, 1),
        "command": "python -m scripts.train_attention " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    tb.finish(model.eval(), stats, args, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
