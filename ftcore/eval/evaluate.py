"""Evaluation of a model on a split: validation loss / perplexity, and generation-based task metrics.

    loss_sum, tokens = validation_loss(model, batcher, batches, device)
    result = evaluate_task(model, tokenizer, examples, data_cfg, eval_cfg, device)
    result == {"metric": "accuracy", "score": 0.41, "scores": {...}, "n": 375, "samples": [...]}
"""

import torch

from ftcore.data.format import encode_prompt, split_prompt
from ftcore.data.tasks import extract_answer, get_task
from ftcore.eval import metrics
from ftcore.eval.few_shot import select_shots, with_shots
from ftcore.model.generate import generate
from ftcore.model.loss import batch_loss_sum  # the training loss, computed inside the model's forward


@torch.no_grad()
def validation_loss(model, batcher, batches: list[list[int]], device, autocast=None) -> tuple[float, int]:
    """(summed token loss, token count) over the given batches; mean loss = sum / count."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for indices in batches:
        with autocast or torch.autocast(device.type, enabled=False):
            loss, n = batch_loss_sum(model, batcher(indices), device)
        total, tokens = total + loss.item(), tokens + int(n)
    model.train(was_training)
    return total, tokens


def score(task, predictions: list[str], references: list[str]) -> dict:
    """The task's metric (and its companions) over extracted answers."""
    if task.metric == "accuracy":
        return {"accuracy": sum(p == r for p, r in zip(predictions, references)) / max(1, len(references))}
    if task.metric == "f1":
        return metrics.classification_report(predictions, references)
    if task.metric == "rouge":
        return metrics.rouge(predictions, references, use_stemmer=True)
    if task.metric == "bleu":
        return {"bleu": metrics.bleu(predictions, references)}
    return {"exact_match": metrics.exact_match(predictions, references)}


def headline(task, scores: dict) -> float:
    """The one number a comparison sorts by."""
    key = {"f1": "f1_macro", "rouge": "rougeL"}.get(task.metric, task.metric)
    return scores[key]


@torch.no_grad()
def evaluate_task(model, tokenizer, examples: list[dict], data_cfg, eval_cfg, device, world=None,
                  shots: list[dict] | None = None, generate_fn=generate) -> dict:  # fmt: skip
    """Generate an answer for every example (greedy, batched, KV cache) and score it.

    shots: training examples shown before every question (the few-shot baseline, few_shot.py).
    generate_fn: generate's signature; e.g. a served model's (ftcore/monitor/remote.py, model None).

    world (a distributed World): every rank calls this together and generates a share of the batches (rank r
    batches r, r + W, ...) on its model, whole (DDP) or sharded (FSDP2: all ranks step each forward together);
    the answers are gathered and every rank returns the same result.
    """
    task = get_task(data_cfg)
    if eval_cfg.max_examples:
        examples = examples[: eval_cfg.max_examples]
    prompts, references, questions = [], [], []
    for ex in examples:
        messages, answer = split_prompt(ex["messages"])
        prompts.append(encode_prompt(with_shots(messages, shots) if shots else messages, data_cfg.template, tokenizer))
        references.append(answer)
        questions.append(messages[-1]["content"])  # the last turn asked
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    outputs = []
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths batch together
    max_new = eval_cfg.max_new_tokens or task.max_new_tokens
    batches = [order[start : start + eval_cfg.batch_size] for start in range(0, len(order), eval_cfg.batch_size)]
    rank, size = (world.rank, world.size) if world is not None and world.distributed else (0, 1)
    mine = batches[rank::size]
    for i in range(-(-len(batches) // size)):
        # FSDP2 needs the same forwards on every rank: a rank out of batches re-runs batch 0, its answers dropped
        idx = mine[i] if i < len(mine) else batches[0]
        new = generate_fn(model, [prompts[j] for j in idx], max_new, stop_ids=tokenizer.stop_ids,
                          pad_id=tokenizer.pad_id, all_done=world.all if size > 1 else None)  # fmt: skip
        if i < len(mine):
            outputs += list(zip(idx, new))
    if size > 1:
        outputs = [pair for part in world.gather(outputs) for pair in part]
    if model is not None:
        model.train(was_training)
    texts = [""] * len(prompts)
    for i, new in outputs:
        texts[i] = tokenizer.decode(new).strip()
    preds = [extract_answer(task, t) for t in texts]
    refs = [extract_answer(task, r) for r in references]
    scores = score(task, preds, refs)
    samples = [{"where": ex.get("where"), "prompt": q, "output": t, "prediction": p, "reference": r,
                **({"group": ex["group"]} if "group" in ex else {})}
               for ex, q, t, p, r in zip(examples, questions, texts, preds, refs)]  # fmt: skip
    return {"task": task.name, "metric": task.metric, "score": headline(task, scores), "scores": scores,
            "n": len(preds), "samples": samples}  # fmt: skip


def evaluate_few_shot(model, tokenizer, splits: dict, data_cfg, eval_cfg, device, world=None) -> dict:
    """The base model's eval.split score with eval.few_shot shots: evaluate_task's result with "k" and "shots"
    (the shots' source lines)."""
    real = [ex for ex in splits["train"] if "augmented" not in ex]  # shots are the user's own examples
    shots = [real[i] for i in select_shots(real, eval_cfg.few_shot, eval_cfg.few_shot_seed)]
    result = evaluate_task(model, tokenizer, splits[eval_cfg.split], data_cfg, eval_cfg, device, world, shots=shots)
    return {**result, "k": eval_cfg.few_shot, "shots": [s["where"] for s in shots]}
