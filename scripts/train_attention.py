"""Continue training the built-in model with attention supervision (phase 3 of its card).

    python -m scripts.train_attention --init FOLDER --out FOLDER [--attention-steps 500 ...]

Phase 2 of scripts/train_builtin.py (answer tokens + probe losses) plus attention losses; the
targets are the model's own attention weights, so nothing of them is in the exported graph.

- `--att-weight`: at every answer token that names a shape's colour or kind, the attention of the
  last decoder layer's first head should fall on that shape's image patches (patches more than
  half covered by it); the loss is -log of that attention mass. Colour questions point at the
  asked shape, "left" at the leftmost one, and in "Describe the picture." each "a {colour}
  {kind}" at the shape of its rank from the left.
- `--value-weight`: a linear probe on what that head writes there must name the shape's colour
  and kind.
- `--kind-weight`: at the position that predicts a colour answer, one head of the first decoder
  layer (`--kind-head`) should attend to the question's shape word; the loss is -log of that
  attention weight.

Why the last one. Trained with the first two only, "What color is the {shape}?" was answered
with the colour of some shape in the scene, not of the one asked about: on 220 colour questions
about 2-3 shape scenes, 63% right, the last layer's head 0 spreading its attention about evenly
over the shapes (0.45 of it on the asked one when right, 0.37 when wrong). The vision features
were not at fault (a linear probe reads each shape patch's kind at 97.7%); no head of either
layer paid the question's shape word any attention (about 1e-20 at the answer position), so the
last layer's query could not know which shape was asked. With the first layer's head 0 made to
copy that word (the loss fell from 54 to 0 within 40 steps), 500 steps from the model of the
card's run 5 took teacher-forced colour on 48 fixed 2-3 shape scenes from 43/73 to 72/73, and
transformers' greedy colour answers on 150 fresh scenes from 91/127 to 134/134 (21.6 min, 2
threads, AVX-512).
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

from llava_pipeline.formats import shapes
from scripts import train_builtin as tb

A_ID, COMMA_ID, AND_ID = 263, 29892, 322  # "▁a", ",", "▁and" in the Llama-2 vocabulary
KIND_IDS = (8607, 6862, 17205)  # "▁circle", "▁square", "▁triangle"


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


def question_kind_loss(attentions, seqs, head: int) -> torch.Tensor:
    """-log of the attention that the first decoder layer's head `head` pays, at the position
    that predicts a colour answer, to the question's shape word: what the last layer's query
    needs to pick the asked shape out of the picture. Zero without colour questions."""
    rows, cols, kpos = [], [], []
    for b, (_, ids, n_prompt, qtype) in enumerate(seqs):
        if qtype == "color":
            rows.append(b)
            cols.append(n_prompt - 1)
            kpos.append(max(p for p in range(n_prompt) if ids[p] in KIND_IDS))
    if not rows:
        return torch.zeros(())
    att = attentions[0][torch.tensor(rows), head, torch.tensor(cols), torch.tensor(kpos)]
    # Not log(att + eps): untrained, the head pays that word 1e-30 or less, and the epsilon
    # would flatten the gradient to nothing.
    return -att.clamp_min(1e-38).log().mean()


def slot_count_loss(attentions, seqs, head: int) -> torch.Tensor:
    """In "Describe the picture.", at each position that predicts a colour or kind word, the first
    decoder layer's head `head` should spread its attention evenly over the prompt's last token
    and the answer's "a" words so far: the share it gives the prompt's last token, 1/(1 + n),
    tells the last layer which shape (the n-th from the left) the words are about. The loss is
    the cross-entropy to that even split. Zero without descriptions."""
    rows, cols, targets = [], [], []
    for b, (_, ids, n_prompt, qtype) in enumerate(seqs):
        if qtype != "describe":
            continue
        for t in range(n_prompt - 1, len(ids) - 1):
            if ids[t + 1] in (A_ID, COMMA_ID, AND_ID, tb.EOS_ID):
                continue
            rows.append(b)
            cols.append(t)
            targets.append([n_prompt - 1] + [p for p in range(n_prompt, t + 1) if ids[p] == A_ID])
    if not rows:
        return torch.zeros(())
    att = attentions[0][torch.tensor(rows), head, torch.tensor(cols)]  # [N, T]
    return torch.stack([-att[i, tgt].clamp_min(1e-38).log().mean() for i, tgt in enumerate(targets)]).mean()


def forward(
    model,
    feats: torch.Tensor,
    seqs,
    slots,
    rank: torch.Tensor,
    kind_head: int = 0,
    slot_head=None,
):
    """train_builtin.answer_logits plus the attention losses (the last layer's, then the first
    layer's on the question's shape word) and, at the supervised positions, what head 0 writes
    (its input to o_proj): (out [N, head_dim], image index [N], rank [N]), or None where no
    position is supervised."""
    captured: dict[str, torch.Tensor] = {}
    attn = model.model.language_model.layers[-1].self_attn
    hook = attn.o_proj.register_forward_pre_hook(lambda mod, inp: captured.__setitem__("x", inp[0]))
    out = model.model.language_model(inputs_embeds=tb.answer_inputs(model, feats, seqs), output_attentions=True)
    hook.remove()
    rows, cols, targets = tb.answer_positions(seqs)
    logits = model.lm_head(out.last_hidden_state[torch.tensor(rows), torch.tensor(cols)])
    losses = {
        "kind": question_kind_loss(out.attentions, seqs, kind_head),
        "slot": torch.zeros(()) if slot_head is None else slot_count_loss(out.attentions, seqs, slot_head),
        "att": torch.zeros(()),
    }
    # The positions whose predicted token names a shape, with that shape's rank.
    flat_slots = [r for per_seq in slots for r in per_seq]
    picked = [(b, t, r) for b, t, r in zip(rows, cols, flat_slots) if r >= 0]
    if not picked:
        return logits, torch.tensor(targets), rows, losses, None
    sr, sc, sranks = (torch.tensor(v) for v in zip(*picked))
    owner_img = torch.tensor([i for i, _, _, _ in seqs])[sr]
    start = torch.tensor([seqs[b][1].index(tb.IMAGE_ID) for b in sr.tolist()])
    att = out.attentions[-1][:, 0]  # last layer, head 0: [B, T, T]
    a_img = att[sr, sc].gather(1, start[:, None] + torch.arange(tb.N_PATCH))
    losses["att"] = -((a_img * (rank[owner_img] == sranks[:, None])).sum(-1) + 1e-4).log().mean()
    head_out = captured["x"][sr, sc, : attn.head_dim]
    return logits, torch.tensor(targets), rows, losses, (head_out, owner_img, sranks)


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
    ap.add_argument(
        "--kind-weight",
        type=float,
        default=0.0,
        help="weight of a loss on the first decoder layer's attention, at a colour answer, to the question's shape word",
    )
    ap.add_argument(
        "--slot-weight",
        type=float,
        default=0.0,
        help='weight of a loss on the first decoder layer\'s attention, in descriptions, to the "a" words so far',
    )
    ap.add_argument("--slot-head", type=int, default=1, help="the first layer's head that --slot-weight trains")
    ap.add_argument("--kind-head", type=int, default=0, help="the first layer's head that --kind-weight trains")
    ap.add_argument(
        "--val-every",
        type=int,
        default=0,
        help="teacher-forced colour accuracy on 48 fixed 2-3 shape scenes every N steps",
    )
    ap.add_argument(
        "--count-hard",
        type=float,
        default=0.0,
        metavar="P",
        help="share of training scenes whose shape sizes decorrelate area from count (train_builtin.HARD_SIDES); "
        "with --val-every, validation adds 48 such scenes' count questions",
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
    # Its own generator: a run without validation draws the same training batches.
    val_rng = random.Random(1_000 + args.seed)
    only_colour = {"count": 0.0, "left": 0.0, "describe": 0.0}
    val = (
        [tb.make_batch(val_rng, prompts, 8, keep=only_colour, shape_weights=[0, 1, 1]) for _ in range(6)]
        if args.val_every
        else []
    )
    if args.val_every and args.count_hard:
        only_count = {"left": 0.0, "describe": 0.0}  # and every colour question, as always
        val += [tb.make_batch(val_rng, prompts, 8, keep=only_count, count_hard=1.0) for _ in range(6)]
    t0 = time.time()
    for step in range(args.attention_steps):
        for g, (_, peak) in zip(opt.param_groups, groups):
            g["lr"] = tb.lr_at(step, args.attention_steps, peak)
        pixels, labels, seqs, slots = tb.make_batch(
            rng,
            prompts,
            args.batch,
            keep=args.keep,
            annotate=slots_for,
            shape_weights=args.shape_weights,
            count_hard=args.count_hard,
        )
        feats = tb.image_features(model, pixels)
        logits, targets, owner, att, picked = forward(
            model,
            feats,
            seqs,
            slots,
            labels["rank"],
            args.kind_head,
            args.slot_head if args.slot_weight else None,
        )
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
        loss = (
            lm_loss
            + args.att_weight * att["att"]
            + args.aux_weight * aux
            + args.value_weight * value_loss
            + args.kind_weight * att["kind"]
            + args.slot_weight * att["slot"]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == args.attention_steps - 1:
            tb.log(
                f"step {step} lm {float(lm_loss):.4f} att {float(att['att']):.3f} value {float(value_loss):.3f} "
                f"kind {float(att['kind']):.3f} slot {float(att['slot']):.3f} aux {float(aux):.3f} ({time.time() - t0:.0f} s)"
            )
        if val and (step % args.val_every == 0 or step == args.attention_steps - 1):
            tb.log(f"step {step} val {tb.validate(model, val)}")
    model.set_attn_implementation("sdpa")
    stats = {
        "attention_minutes": round((time.time() - t0) / 60, 1),
        "command": "python -m scripts.train_attention " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    tb.finish(model.eval(), stats, args, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
