"""`vilt.evaluate_vqa`: VQA score of a `vilt.finetune_vqa` output on one split of the VQAv2 arrows.

Two scores. `vqa_accuracy` is the official VQA accuracy (GT-Vision-Lab/VQA vqaEval.py: the predicted answer against
the question's 10 raw annotator answers, with its answer normalisation; `official_accuracy` in
stages/data/arrow_vqa.py) wherever arrow.vqav2 wrote the split's annotator answers (`vqav2_<split>_gt.json`: val,
trainable_val, rest_val). `vqa_score` is what ViLT's validation reports: the soft score of the predicted answer over
the vocabulary targets (min(1, annotators who gave it / 3), in ViLT's steps). Both are means over the split's
questions, which (as in ViLT) exclude questions none of whose annotators gave a vocabulary answer, so neither is the
official score of the whole val split; test-dev predictions scored by the challenge server are. Reported beside
them: the best constant answer's soft score on the same questions (what ignoring the image and the question would
get) and the vocabulary's ceiling (the mean best target score).
`predictions.json` is in the VQA challenge's submission format ([{question_id, answer}]), so a test-dev run can be
uploaded as is. Under the launcher each rank answers its share of the questions on its device in the launch's
precision, with every image patch (deterministic); rank 0 gathers the answers.
"""
from __future__ import annotations

import json
import time

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Subset
from transformers import ViltForQuestionAnswering
from vlflow.stages.common.device import autocast, launch_precision, limit_cpu_threads, stage_device
from vlflow.stages.common.evaluation import gather_on_main, my_share, rank_and_world
from vlflow.stages.data.arrow_vqa import gt_file, official_accuracy
from vlflow.stages.vilt.data import QuestionCollator, QuestionPairs, load_trained_run, vqa_dataset
from vlflow.stages.vilt.evaluate import ImageBatch, embed_all_patches, patch_grids
from vlflow.stages.vilt.model import encode

from vlflow.errors import StageError
from vlflow.stage import StageContext


def image_batch_of(batch: dict, patch_size: int) -> ImageBatch:
    """The collated batch's images with their patch grids (computed on the host)."""
    return ImageBatch(batch["pixel_values"], batch["pixel_mask"], patch_grids(batch["pixel_mask"], patch_size))


@torch.no_grad()
def answer_questions(vqa: ViltForQuestionAnswering, loader, device: torch.device,
                     precision: str = "fp32") -> list[dict]:
    """Per question: id, predicted label and its targets as {label: score} (empty on test splits). The model runs on
    `device` in `precision` with every image patch (deterministic); targets stay on the host."""
    results = []
    for batch in loader:
        images = image_batch_of(batch, vqa.config.patch_size).to(device)
        with autocast(precision, device):
            image_embeds, image_mask = embed_all_patches(vqa.vilt, images)
            pooled = encode(vqa.vilt, batch["input_ids"].to(device, non_blocking=True),
                            batch["attention_mask"].to(device, non_blocking=True), image_embeds, image_mask).pooled
            labels = vqa.classifier(pooled).argmax(1).cpu()
        for question_id, label, targets in zip(batch["question_id"].tolist(), labels.tolist(), batch["targets"]):
            labels = targets.nonzero().squeeze(1)
            results.append({"question_id": question_id, "label": label,
                            "targets": dict(zip(labels.tolist(), targets[labels].tolist()))})
    return results


def vqa_metrics(results: list[dict], num_answers: int) -> dict:
    """VQA score, best constant answer and vocabulary ceiling of answered questions (with targets)."""
    if not results:
        return {}
    per_label = torch.zeros(num_answers)
    for r in results:
        for label, score in r["targets"].items():
            per_label[label] += score
    n = len(results)
    return {"vqa_score": sum(r["targets"].get(r["label"], 0.0) for r in results) / n,
            "best_constant_score": float(per_label.max()) / n,
            "best_constant_label": int(per_label.argmax()),
            "ceiling": sum(max(r["targets"].values()) for r in results) / n}


def official_vqa_accuracy(predictions: list[dict], annotators: dict[str, list[str]]) -> dict:
    """The official VQA accuracy of `predictions` ([{question_id, answer}]) against each question's raw annotator
    answers (`annotators`: str(question_id) -> answers); questions without annotator answers are left out."""
    scored = [official_accuracy(p["answer"], annotators[str(p["question_id"])]) for p in predictions
              if str(p["question_id"]) in annotators]
    return {"vqa_accuracy": sum(scored) / len(scored), "vqa_accuracy_questions": len(scored)} if scored else {}


def evaluate_vqa(ctx: StageContext) -> dict:
    p = ctx.params
    limit_cpu_threads()
    device, precision = stage_device(), launch_precision(ctx)
    run = load_trained_run(ctx.inputs["model"], ctx.inputs)
    vqa = ViltForQuestionAnswering.from_pretrained(str(run.model_dir)).eval()
    if "ViltForQuestionAnswering" not in (vqa.config.architectures or []):
        raise StageError(f"{run.model_dir} is not a VQA model (architectures {vqa.config.architectures}); give a "
                         f"vilt.finetune_vqa output", field="inputs.model")
    vqa.to(device)
    answers = [vqa.config.id2label[i] for i in range(vqa.config.num_labels)]
    image_size, max_image_size, max_text_len = run.geometry(p)
    questions = QuestionPairs(vqa_dataset(ctx.inputs["arrows"], [p.split], image_size, max_image_size))
    count = min(len(questions), p.max_questions or len(questions))

    _, world_size = rank_and_world()
    mine = Subset(questions, my_share(range(count)))
    collate = QuestionCollator(run.tokenizer, max_text_len, len(answers), normalize=False)  # normalised on device
    loader = DataLoader(mine, batch_size=p.batch_size, collate_fn=collate, num_workers=p.num_workers,
                        pin_memory=device.type == "cuda")
    ctx.log.info("answering %d %s questions over %d answers on %d rank(s), %s %s", count, p.split, len(answers),
                 world_size, device, precision)
    started = time.perf_counter()
    results = gather_on_main(answer_questions(vqa, loader, device, precision))
    if results is None:  # not rank 0: its answers are delivered
        return {}
    results.sort(key=lambda r: r["question_id"])

    predictions = [{"question_id": r["question_id"], "answer": answers[r["label"]]} for r in results]
    (ctx.output_dir / "predictions.json").write_text(json.dumps(predictions))
    annotated = [r for r in results if r["targets"]]
    metrics = vqa_metrics(annotated, len(answers))
    if metrics:
        metrics["best_constant_answer"] = answers[metrics.pop("best_constant_label")]
    gt_path = ctx.inputs["arrows"] / gt_file(p.split)
    if gt_path.is_file():
        metrics.update(official_vqa_accuracy(predictions, json.loads(gt_path.read_text())))
    metrics.update(split=p.split, questions=len(results), annotated=len(annotated), ranks=world_size,
                   precision=precision)
    (ctx.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    # run facts stay out of the data (manifest only)
    metrics.update(seconds=round(time.perf_counter() - started, 1), device=device.type)

    table = Table(title=f"{ctx.stage}: VQA on {p.split}")
    for column in ("questions", "VQA accuracy (official)", "VQA score (ViLT)", "best constant answer", "ceiling"):
        table.add_column(column, justify="right")
    if annotated:
        official = f"{100 * metrics['vqa_accuracy']:.2f}" if "vqa_accuracy" in metrics else "no annotator answers"
        table.add_row(str(len(results)), official, f"{100 * metrics['vqa_score']:.2f}",
                      f"{100 * metrics['best_constant_score']:.2f} ({metrics['best_constant_answer']!r})",
                      f"{100 * metrics['ceiling']:.2f}")
    else:
        table.add_row(str(len(results)), "no answers in this split", "", "", "")
    Console().print(table)
    return metrics
