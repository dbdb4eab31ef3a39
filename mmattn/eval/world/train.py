"""Train the offline world's tiny LLaVA from scratch (seeded, deterministic) and save it with ``save_pretrained``.

    python -m mmattn.eval.world.train --out mmattn/eval/world/model --seed 0 --device cuda   # GPU: minutes
    python -m mmattn.eval.world.train --out DIR --seed 0 --device cpu                         # CPU: under an hour

Every epoch, every training image (generated on the fly from ``--data-seed``; the val split is never used)
gives two rows: a description (``"Please describe this image in detail."`` or one of three rarer paraphrases
-> the image's detailed caption, synonyms re-drawn each epoch), and a multi-turn conversation, as in LLaVA's
instruction data, of ``--qa-turns`` POPE-style questions (``"Is there a {object} in the image?"``, sometimes
with LLaVA's / VCD's answer-format suffixes) answered "yes" (an object in the image) or "no" (a category drawn
uniformly from those absent), half of each, in random order. Uniform negatives, like the
rare negatives of real instruction data, leave the co-occurrence priors of the captions in place: the model
says "yes" to absent objects that usually come with what it sees, so POPE adversarial < POPE random.

Determinism: everything is seeded; ``torch.use_deterministic_algorithms(True)`` with eager attention and TF32
off. The same command on the same kind of device gives the same weights; CPU and GPU differ in rounding only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

from ..io import directory_replaced_on_success, write_json_atomic
from . import build
from . import generate as gen

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")


def _gen_images(seed: int, start: int, num: int) -> tuple[np.ndarray, list]:
    samples = gen.generate_split(seed, "train", num, start)
    return np.stack([s.image for s in samples]), [(s.scene, s.objects) for s in samples]


def make_train_set(seed: int, num: int, workers: int = 1) -> tuple[np.ndarray, list]:
    """(uint8 images [N, 64, 64, 3], [(scene, objects)]): train samples 0..num-1 (order-independent)."""
    chunk = 500
    jobs = [(seed, s, min(chunk, num - s)) for s in range(0, num, chunk)]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            parts = pool.starmap(_gen_images, jobs)
    else:
        parts = [_gen_images(*j) for j in jobs]
    return np.concatenate([p[0] for p in parts]), [m for p in parts for m in p[1]]


def _choice(rng, weighted):
    w = np.array([x[1] for x in weighted])
    return weighted[int(rng.choice(len(weighted), p=w / w.sum()))][0]


class RowBuilder:
    """Token rows (prompt ids, answer ids) for one epoch, deterministic in (seed, epoch)."""

    def __init__(self, tokenizer, num_image_tokens: int):
        self.tok = tokenizer
        self.n_img = num_image_tokens
        self.eos = tokenizer.eos_token_id
        self._prompt_cache: dict[str, list[int]] = {}
        self._answer_cache: dict[str, list[int]] = {}
        self.names = [c["name"] for c in gen.CATEGORIES]
        self.words = {c["name"]: c["words"] for c in gen.CATEGORIES}

    def prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self._prompt_cache:
            text = build.prompt_text(prompt).replace(build.IMAGE_TOKEN, build.IMAGE_TOKEN * self.n_img)
            self._prompt_cache[prompt] = self.tok(text)["input_ids"]
        return self._prompt_cache[prompt]

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self._answer_cache:
            ids = self.tok(answer, add_special_tokens=False)["input_ids"]
            if self.tok.unk_token_id in ids:
                raise ValueError(f"out-of-vocabulary word in training target {answer!r}")
            self._answer_cache[answer] = ids + [self.eos]
        return self._answer_cache[answer]

    def question(self, rng, name: str) -> str:
        obj = name if rng.random() < 0.8 else self.words[name][int(rng.integers(len(self.words[name])))]
        q = build.pope_question(obj, typo=rng.random() < 0.1)
        return q + _choice(rng, build.QUESTION_SUFFIXES)

    def turn_ids(self, prompt: str) -> list[int]:
        """A later user turn (no image): "USER: {prompt} ASSISTANT:"."""
        key = "\0" + prompt
        if key not in self._prompt_cache:
            self._prompt_cache[key] = self.tok(f"USER: {prompt} ASSISTANT:", add_special_tokens=False)["input_ids"]
        return self._prompt_cache[key]

    def epoch_rows(self, seed: int, epoch: int, meta: list, qa_turns: int) -> list[tuple[int, list, list]]:
        """Per image two rows: a description, and a conversation of ``qa_turns`` yes/no questions (half yes)."""
        rows = []
        for i, (scene, objects) in enumerate(meta):
            rng = np.random.default_rng([seed, 7, epoch, i])
            prompt = _choice(rng, build.CAPTION_PROMPTS)
            p, a = self.prompt_ids(prompt), self.answer_ids(gen.detailed_caption(rng, scene, objects))
            rows.append((i, p + a, [-100] * len(p) + a))
            present = sorted({o["name"] for o in objects})
            absent = [n for n in self.names if n not in present]
            answers = [k % 2 == 0 and bool(present) for k in range(qa_turns)]
            rng.shuffle(answers)
            pos = [present[j] for j in rng.permutation(len(present))] if present else []
            neg = [absent[j] for j in rng.permutation(len(absent))]
            ids, labels = [], []
            for k, yes in enumerate(answers):
                name = pos[k % len(pos)] if yes else neg[k]  # distinct objects where possible
                q = self.question(rng, name)
                p = self.prompt_ids(q) if k == 0 else self.turn_ids(q)
                a = self.answer_ids("yes" if yes else "no")
                ids += p + a
                labels += [-100] * len(p) + a
            rows.append((i, ids, labels))
        return rows


def collate(rows, images_u8, mean, std, device, pad_id: int):
    import torch

    width = max(len(x) for _, x, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (_, x, y) in enumerate(rows):
        ids[r, :len(x)] = torch.tensor(x)
        labels[r, :len(y)] = torch.tensor(y)
        mask[r, :len(x)] = 1
    idx = torch.tensor([i for i, _, _ in rows])
    pix = images_u8[idx].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    pix = (pix - mean) / std
    return ids.to(device), mask.to(device), labels.to(device), pix


def train(out: str, seed: int = 0, device: str = "cpu", num_train: int = 24000, epochs: int = 6,
          batch_size: int = 64, lr: float = 2e-3, qa_turns: int = 4, data_seed: int = 0, workers: int = 1,
          log_every: int = 50, max_steps: int | None = None, max_minutes: float | None = None,
          amp: bool = False, stop_step: int | None = None) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration

    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    t0 = time.time()

    vocab = build.vocabulary(data_seed)
    tokenizer = build.build_tokenizer(vocab)
    processor = build.build_processor(tokenizer)
    config = build.build_config(len(tokenizer))
    images, meta = make_train_set(data_seed, num_train, workers)
    t_data = time.time() - t0
    print(f"data: {len(meta)} images, vocab {len(tokenizer)}, {t_data:.1f}s", flush=True)

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std, device=device).view(1, 3, 1, 1)
    images_t = torch.from_numpy(images)
    if device.startswith("cuda"):
        images_t = images_t.to(device)

    rows_builder = RowBuilder(tokenizer, config.image_seq_length)
    steps_per_epoch = math.ceil(2 * num_train / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    warmup = max(1, int(0.03 * total))
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n or "embed" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))))

    step, t_train, history = 0, time.time(), []
    def out_of_time() -> bool:
        return bool(max_minutes) and time.time() - t_train > 60 * max_minutes

    running = 0.0
    for epoch in range(epochs):
        if step >= total or out_of_time() or (stop_step is not None and step >= stop_step):
            break
        rows = rows_builder.epoch_rows(data_seed, epoch, meta, qa_turns)
        perm = np.random.default_rng([seed, 11, epoch]).permutation(len(rows))
        for b in range(steps_per_epoch):
            if step >= total or out_of_time() or (stop_step is not None and step >= stop_step):
                break
            batch = [rows[j] for j in perm[b * batch_size:(b + 1) * batch_size]]
            ids, mask, labels, pix = collate(batch, images_t, mean, std, device, tokenizer.pad_token_id)
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
                loss = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            running += loss.item()
            if step % log_every == 0:
                history.append((step, running / log_every))
                print(f"epoch {epoch} step {step}/{total} loss {running / log_every:.4f} "
                      f"lr {sched.get_last_lr()[0]:.2e} {time.time() - t_train:.0f}s", flush=True)
                running = 0.0
    train_s = time.time() - t_train

    model.eval().to("cpu")
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    info = {"seed": seed, "data_seed": data_seed, "device": device, "num_train": num_train, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "amp_bf16": amp, "torch_threads": torch.get_num_threads(), "qa_turns": qa_turns, "steps": step,
            "planned_steps": total, "stop_step": stop_step, "parameters": n_params, "data_seconds": round(t_data, 1), "train_seconds": round(train_s, 1),
            "final_loss": history[-1][1] if history else None}
    with directory_replaced_on_success(out) as folder:
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
        write_json_atomic(os.path.join(folder, "training_info.json"), info, indent=1)
    print(json.dumps(info), flush=True)
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the offline world's tiny LLaVA.")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-train", type=int, default=24000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--qa-turns", type=int, default=4)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes generating the training images")
    p.add_argument("--max-steps", type=int, default=None, help="stop early (smoke tests)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast (about 1.6x faster on CPUs with AVX512-BF16; results differ from float32)")
    p.add_argument("--stop-step", type=int, default=None,
                   help="stop after this many steps, keeping the learning-rate schedule of the full run")
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this long, then save")
    a = p.parse_args(argv)
    train(a.out, a.seed, a.device, a.num_train, a.epochs, a.batch_size, a.lr, a.qa_turns, a.data_seed,
          a.workers, a.log_every, max_steps=a.max_steps, max_minutes=a.max_minutes,
          amp=a.amp, stop_step=a.stop_step)


if __name__ == "__main__":
    main()
