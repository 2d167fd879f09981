"""Stage: score the emitted program against the transformers reference (llava_pipeline.runtime.evaluate).

metrics/quality.json          the deterministic quality metrics (a DVC metrics output, in git)
outputs/evaluate/answers.json  per question: the right answer, the reference's and the .pte's
outputs/metrics/evaluate.json  run time: image encode, prefill and decode speed, peak RSS

Fails (one line naming the metric, its value and the floor) when a metric is past one of the
`evaluate.min_*` / `evaluate.max_kl` floors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from llava_pipeline.base import files
from llava_pipeline.formats.ptesize import method_bytes
from llava_pipeline.pipeline import evalset, stage
from llava_pipeline.runtime import evaluate

QUALITY = Path("metrics") / "quality.json"


def body(ctx: stage.StageContext) -> None:
    e = ctx.cfg.evaluate
    stage.upstream("emit", ctx.outputs)
    pte = ctx.read("program", ctx.outputs / "llava.pte")
    tokenizer = ctx.read("tokenizer", ctx.outputs / "tokenizer.bin")
    ref_dir = ctx.read("reference", stage.upstream("reference", ctx.outputs))
    records = files.read_json(ref_dir / "reference.json")["records"]
    evaluate.require_same_set(records, evalset.load(e.set, e.scenes, e.seed)[0])
    pixels = torch.load(ref_dir / "pixels.pt", weights_only=True)

    answers = evaluate.runner_answers(
        pte, tokenizer, records, pixels, e.max_new_tokens, progress=lambda xs: ctx.progress(xs, "runner answers")
    )
    logps = evaluate.teacher_forced(
        pte, tokenizer, records, pixels, progress=lambda xs: ctx.progress(xs, "teacher-forced logits")
    )
    quality = evaluate.quality_metrics(records, answers, logps, method_bytes(pte))
    speed = evaluate.speed_metrics(answers)
    files.write_json(ctx.out / "quality.json", quality)
    files.write_json(
        ctx.out / "answers.json",
        [
            {
                "image": r["image"],
                "question": r["question"],
                "answer": r["answer"],
                "reference": r["text"],
                "pte": a.text,
            }
            for r, a in zip(records, answers)
        ],
    )
    ctx.metrics.update(speed)
    ctx.summary = evaluate.summary(quality, speed)
    evaluate.check_floors(quality, evaluate.Floors(e.min_accuracy, e.min_agreement, e.min_top1, e.max_kl))


def publish(ctx: stage.StageContext, folder: Path) -> None:
    QUALITY.parent.mkdir(parents=True, exist_ok=True)
    tmp = QUALITY.with_name(".quality.json.partial")
    tmp.write_bytes((folder / "quality.json").read_bytes())
    os.replace(tmp, QUALITY)
    ctx.wrote = [QUALITY, folder]


# The config this stage reads, recorded in its manifest: dvc.yaml's params for it.
SECTIONS = ("evaluate",)


def main(argv: list[str] | None = None) -> int:
    return stage.run("evaluate", body, sections=SECTIONS, argv=argv, publish=publish)


if __name__ == "__main__":
    sys.exit(main())
