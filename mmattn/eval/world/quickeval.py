"""Self-contained checks of the world model: batched generation, quick CHAIR / POPE.

The project's evaluators (``mmattn.eval.chair``, ``mmattn.eval.pope``) are the reference; this module needs
nothing beyond torch/transformers (no nltk, no pycocotools), so it runs anywhere, including the GPU machine
right after training. Its CHAIR uses the CHAIR synonym table with plain word matching (two-word names merged
first), which is exact for the world model's vocabulary.

    python -m mmattn.eval.world.quickeval --model DIR --out DIR [--device cuda] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

__all__ = ["generate_captions", "answer_questions", "quick_chair", "pope_metrics",
           "load_synonyms", "caption_objects"]

POPE_KINDS = ("random", "popular", "adversarial")


def _objects_per_image(instances: dict) -> dict[int, list[str]]:
    names = {c["id"]: c["name"] for c in instances["categories"]}
    out: dict[int, list[str]] = {im["id"]: [] for im in instances["images"]}
    for a in instances["annotations"]:
        n = names[a["category_id"]]
        if n not in out[a["image_id"]]:
            out[a["image_id"]].append(n)
    return out


def _batches(items, n):
    for k in range(0, len(items), n):
        yield items[k:k + n]


def _generate(model, processor, images, prompts, max_new_tokens: int, batch_size: int) -> list[str]:
    import torch

    outs = []
    device = next(model.parameters()).device
    for chunk in _batches(list(zip(images, prompts)), batch_size):
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            add_generation_prompt=True) for _, p in chunk]
        inputs = processor(images=[im for im, _ in chunk], text=texts, return_tensors="pt", padding=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        outs += processor.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [o.strip() for o in outs]


def _open(image_dir, name):
    from PIL import Image

    with Image.open(os.path.join(image_dir, name)) as im:
        return im.convert("RGB")


def generate_captions(model, processor, instances: dict, image_dir, prompt: str = "Please describe this image in detail.",
                      max_new_tokens: int = 64, batch_size: int = 64, limit: int | None = None) -> list[dict]:
    images = instances["images"][:limit]
    caps = _generate(model, processor, [_open(image_dir, im["file_name"]) for im in images],
                     [prompt] * len(images), max_new_tokens, batch_size)
    return [{"image_id": im["id"], "caption": c} for im, c in zip(images, caps)]


def answer_questions(model, processor, questions: list[dict], image_dir, max_new_tokens: int = 4,
                     batch_size: int = 128) -> list[dict]:
    cache: dict[str, object] = {}
    imgs = []
    for q in questions:
        if q["image"] not in cache:
            cache[q["image"]] = _open(image_dir, q["image"])
        imgs.append(cache[q["image"]])
    answers = _generate(model, processor, imgs, [q["text"] for q in questions], max_new_tokens, batch_size)
    return [{"question_id": q["question_id"], "text": a} for q, a in zip(questions, answers)]


def pope_metrics(questions: list[dict], answers: list[dict]) -> dict:
    """Parser A (RUCAIBox evaluate.py / LLaVA eval_pope.py): first sentence, 'No'/'not'/'no' token -> no."""
    by_id = {a["question_id"]: a["text"] for a in answers}
    tp = fp = tn = fn = 0
    for q in questions:
        text = by_id[q["question_id"]]
        if "." in text:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        pred = "no" if any(w in ("No", "not", "no") for w in words) else "yes"
        if q["label"] == "yes":
            tp, fn = tp + (pred == "yes"), fn + (pred == "no")
        else:
            fp, tn = fp + (pred == "yes"), tn + (pred == "no")
    n = max(tp + fp + tn + fn, 1)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": (tp + tn) / n, "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0, "yes_ratio": (tp + fp) / n, "n": n}


def load_synonyms(path=None) -> dict[str, str]:
    """CHAIR synonym table: word -> COCO category name (mmattn/eval/data/synonyms.txt, else ../shared)."""
    here = Path(__file__).resolve()
    cands = [Path(path)] if path else [here.parents[1] / "data" / "synonyms.txt",
                                       here.parents[3].parent / "shared" / "data" / "chair" / "synonyms.txt"]
    for p in cands:
        if p.exists():
            table = {}
            for line in p.read_text().splitlines():
                words = [w for w in line.strip().split(", ")]
                for w in words:
                    table[w] = words[0]
            return table
    raise FileNotFoundError(f"CHAIR synonyms.txt not found in {[str(c) for c in cands]}")


def caption_objects(caption: str, synonyms: dict[str, str]) -> list[str]:
    """COCO category per object mention (two-word names first, plain 's' plurals folded)."""
    words = re.findall(r"[a-z]+", caption.lower())
    out, i = [], 0
    while i < len(words):
        pair = " ".join(words[i:i + 2])
        if i + 1 < len(words) and pair in synonyms:
            out.append(synonyms[pair])
            i += 2
            continue
        w = words[i]
        for cand in (w, w[:-1] if w.endswith("s") else None):
            if cand and cand in synonyms:
                out.append(synonyms[cand])
                break
        i += 1
    return out


def quick_chair(captions: list[dict], instances: dict, synonyms: dict[str, str] | None = None) -> dict:
    synonyms = synonyms or load_synonyms()
    gt = {i: set(v) for i, v in _objects_per_image(instances).items()}
    mentions = halluc = covered = total_gt = bad_caps = 0
    for c in captions:
        found = caption_objects(c["caption"], synonyms)
        g = gt[c["image_id"]]
        h = sum(1 for w in found if w not in g)
        mentions += len(found)
        halluc += h
        bad_caps += h > 0
        covered += len(set(found) & g)
        total_gt += len(g)
    return {"chair_s": bad_caps / max(len(captions), 1), "chair_i": halluc / max(mentions, 1),
            "recall": covered / max(total_gt, 1), "n": len(captions)}


def main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from . import default_root, val_image_dir, val_instances_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model dir (default: the shipped world model)")
    p.add_argument("--data", default=None, help="dir with instances_val.json and images/ (default: shipped)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=None, help="captions for the first N images only")
    a = p.parse_args(argv)
    model_dir = a.model or os.path.join(default_root(), "model")
    inst_path = os.path.join(a.data, "instances_val.json") if a.data else val_instances_path()
    image_dir = os.path.join(a.data, "images") if a.data else val_image_dir()
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).to(a.device).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    instances = json.load(open(inst_path))
    os.makedirs(a.out, exist_ok=True)
    caps = generate_captions(model, processor, instances, image_dir, limit=a.limit)
    with open(os.path.join(a.out, "captions.jsonl"), "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in caps)
    metrics = {}
    try:
        metrics["chair_quick"] = quick_chair(caps, instances)
    except FileNotFoundError as e:
        print(e)
    for kind in POPE_KINDS:
        qs = [json.loads(line) for line in open(os.path.join(os.path.dirname(inst_path), f"pope_{kind}.json"))]
        ans = answer_questions(model, processor, qs, image_dir)
        with open(os.path.join(a.out, f"pope_{kind}.jsonl"), "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in ans)
        metrics[f"pope_{kind}"] = pope_metrics(qs, ans)
    print(json.dumps(metrics, indent=1))
    with open(os.path.join(a.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)


if __name__ == "__main__":
    main()
