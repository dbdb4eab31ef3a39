"""LVLM demo: the same image and prompt answered by the plain model and by the patched model, side by side.

``mmattn demo lvlm [--model PATH_OR_ID]`` (default: the offline world's tiny LLaVA, no downloads) serves a Gradio
app where a user picks an offline-world val image (which has COCO-format ground truth) or uploads one, types a
prompt, ticks methods and moves their main options. Each run streams the baseline answer, then the patched
answer, and then shows for both

- the hallucinated objects (CHAIR: object words of the answer that are not in the image's ground truth), when
  the image has ground truth;
- where the answer looked: the attention mass that the generated tokens put on each image patch (all layers and
  heads averaged, recorded by :class:`~mmattn.demos.attention_map.ImageAttentionRecorder`), overlaid on the part
  of the image the model sees, with one colour scale for both so that "after" is comparable to "before".

Methods are chosen as ``--method`` specs (one per line, ``mmattn.parse_method_spec``); the checkboxes and sliders
only write that text, so every option of every registered method is reachable by editing it.

Safety: uploads are images only (checked by decoding them, not by their name), at most
:data:`MAX_UPLOAD_BYTES`; the server reads files only from gradio's upload cache and the world's image folder
(the only ``allowed_paths``); example images are chosen by name from a fixed list; share links are off unless
asked for; errors reach the user as messages, never as tracebacks. One generation runs at a time (the model and
its patch are shared), the others wait in a bounded queue.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import gradio as gr
import numpy as np
import torch
from PIL import Image

import mmattn

from ..lvlm.methods.base import METHODS, AttentionMethod, parse_method_spec
from .attention_map import (
    HEATMAP_SIZE,
    ImageAttentionRecorder,
    image_patch_grid,
    kept_patch_grid,
    model_view,
    patch_grid_side,
    render_heatmap,
)
from .errors import DemoInputError, errors_as_messages

__all__ = [
    "DemoInputError",
    "WorldExamples",
    "LVLMDemo",
    "MAIN_OPTIONS",
    "build_method_spec",
    "parse_method_specs",
    "load_upload",
    "launch",
]

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Please describe this image in detail."  # the CHAIR prompt: answers name objects
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000  # decoded size guard (a small compressed file can decode to gigabytes)
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 256
DEFAULT_MAX_NEW_TOKENS = 48
NUM_GALLERY_EXAMPLES = 12
NUM_EXAMPLES = 100  # example choices offered (the world's val split has 500)
QUEUE_MAX_SIZE = 16

# The main options offered as sliders, per method: (minimum, maximum, step) and a one-line meaning.
# Defaults come from each method's Config dataclass; options not listed here stay reachable through the spec text.
MAIN_OPTIONS: dict[str, dict[str, tuple[float, float, float, str]]] = {
    "var": {
        "rho": (0.0, 1.0, 0.05, "minimum visual non-sink ratio of a head (0.5: hallucination preset)"),
        "transfer": (0.0, 1.0, 0.05, "fraction of sink attention moved onto image tokens"),
    },
    "gift": {"alpha": (0.0, 10.0, 0.5, "saliency strength")},
    "vhr": {"alpha": (0.0, 4.0, 0.1, "output scale of vision-aware heads")},
    "paint": {
        "alpha": (0.0, 2.0, 0.05, "|z| gain on local image tokens"),
        "beta": (0.0, 2.0, 0.05, "|z| gain on summary image tokens"),
        "cfg_gamma": (1.0, 2.0, 0.05, "image-free guidance strength (1 = off)"),
    },
    "role_bias": {"image": (-5.0, 5.0, 0.1, "logit bias on image tokens")},
    "transprune": {"alpha": (0.0, 1.0, 0.05, "weight of token transition against instruction-guided attention")},
}
DEFAULT_METHODS = ("var",)


# ------------------------------------------------------------------------------------------- method specs


def _config_defaults(name: str) -> dict[str, Any]:
    config = METHODS[name].Config()
    return {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}


def slider_options() -> list[tuple[str, str]]:
    """(method, option) of every slider, in the order the app passes their values."""
    return [(name, option) for name in sorted(MAIN_OPTIONS) if name in METHODS for option in MAIN_OPTIONS[name]]


def _format_value(value: Any, default: Any) -> str:
    if isinstance(default, bool):
        return "true" if value else "false"
    if isinstance(default, int):
        return str(int(round(value)))
    return f"{float(value):g}"


def build_method_spec(selected: Sequence[str], values: Sequence[float]) -> str:
    """The ``--method`` specs (one per line) for the ticked methods with their slider values.

    ``values`` follow :func:`slider_options`; only options that differ from the Config default are written, so
    the text reads like a command line.
    """
    pairs = slider_options()
    if len(values) != len(pairs):
        raise ValueError(f"expected {len(pairs)} slider values, got {len(values)}")
    by_method: dict[str, list[str]] = {}
    for (name, option), value in zip(pairs, values):
        default = _config_defaults(name)[option]
        if value is not None and _format_value(value, default) != _format_value(default, default):
            by_method.setdefault(name, []).append(f"{option}={_format_value(value, default)}")
    lines = []
    for name in selected:
        options = by_method.get(name, [])
        lines.append(f"{name}:{','.join(options)}" if options else name)
    return "\n".join(lines)


def parse_method_specs(text: str) -> list[AttentionMethod]:
    """One ``--method`` spec per line -> method instances; errors name the line."""
    methods = []
    for number, line in enumerate((text or "").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            methods.append(parse_method_spec(line))
        except (ValueError, TypeError) as error:
            raise DemoInputError(f"method spec line {number} ({line!r}): {error}") from None
    if not methods:
        raise DemoInputError("choose at least one method: the patched answer would equal the baseline")
    return methods


# ------------------------------------------------------------------------------------------------ images


def load_upload(path: str | Path) -> Image.Image:
    """Decode an uploaded file as an RGB image, refusing anything that is not a reasonable image file."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise DemoInputError("the uploaded file is gone; upload it again") from None
    if size > MAX_UPLOAD_BYTES:
        raise DemoInputError(f"the image is {size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES / 2**20:.0f} MB")
    from PIL import ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.format not in UPLOAD_FORMATS:
                raise DemoInputError(f"{image.format} images are not accepted; use {', '.join(UPLOAD_FORMATS)}")
            if image.width * image.height > MAX_UPLOAD_PIXELS:
                raise DemoInputError(f"the image is {image.width}x{image.height} pixels; that is too large")
            return ImageOps.exif_transpose(image).convert("RGB")  # phone photos carry their rotation in EXIF
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise DemoInputError("the uploaded file is not an image this demo can read") from None
    except OSError as error:
        raise DemoInputError(f"cannot read the uploaded image: {error}") from None


class WorldExamples:
    """Example images with COCO-format ground truth: the offline world's val split (or another COCO folder).

    ``annotations`` must hold ``instances_*.json`` and ``captions_*.json`` (CHAIR's ground truth is the union of
    instance categories and objects named in human captions); images are looked up by ``file_name``.
    """

    def __init__(self, image_dir: str | Path, annotations: str | Path, limit: int | None = None) -> None:
        self.image_dir = Path(image_dir).resolve()
        self.annotations = Path(annotations)
        instances = sorted(self.annotations.glob("instances_*.json"))
        if not instances:
            raise FileNotFoundError(f"no instances_*.json in {self.annotations}")
        with open(instances[0], encoding="utf-8") as handle:
            images = json.load(handle)["images"]
        ids = {entry["file_name"]: int(entry["id"]) for entry in images}
        names = sorted(name for name in ids if (self.image_dir / name).is_file())
        self.names = names[:limit] if limit else names
        self._ids = {name: ids[name] for name in self.names}
        self._ground_truth: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    @classmethod
    def offline_world(cls, limit: int | None = None) -> "WorldExamples | None":
        """The shipped world's val images, or None when the package was installed without them."""
        from ..eval import world

        try:
            return cls(world.val_image_dir(), world.val_dir(), limit)
        except (FileNotFoundError, KeyError, ValueError):
            return None

    def path(self, name: str) -> Path:
        """The file of example ``name``; only names from the fixed list are accepted (no path tricks)."""
        if name not in self._ids:
            raise DemoInputError(f"unknown example image {name!r}")
        return self.image_dir / name

    def image_id(self, name: str) -> int:
        self.path(name)
        return self._ids[name]

    def ground_truth(self, name: str, extractor) -> set[str]:
        """CHAIR ground-truth objects of example ``name`` (COCO category names), cached."""
        from ..eval.chair import load_ground_truth

        image_id = self.image_id(name)
        with self._lock:
            if image_id not in self._ground_truth:
                found = load_ground_truth(self.annotations, extractor, image_ids=[image_id])
                self._ground_truth[image_id] = set(found.get(image_id, set()))
            return self._ground_truth[image_id]


# ------------------------------------------------------------------------------------------- the demo core


@dataclass
class RunResult:
    """One finished generation: its answer and the recorder that watched it."""

    answer: str
    recorder: ImageAttentionRecorder

    @property
    def generated_tokens(self) -> int:
        return self.recorder.num_generated_rows


class LVLMDemo:
    """The model, its processor and the example images behind the app; usable without a browser.

    ``stream`` / ``compare`` are plain Python generators; :meth:`build_app` wires them into Gradio.
    """

    def __init__(self, model, processor, model_name: str, examples: WorldExamples | None = None,
                 default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        self.model = model
        self.processor = processor
        self.model_name = model_name
        self.examples = examples
        self.default_max_new_tokens = default_max_new_tokens
        self.grid_side = patch_grid_side(model.config)
        self._lock = threading.Lock()  # one generation at a time: patching changes the shared model
        self._extractor = None
        self._extractor_error: str | None = None

    @classmethod
    def from_pretrained(cls, model: str | None = None, device: str | None = None, dtype: str | None = None,
                        examples: WorldExamples | None = None, **kwargs: Any) -> "LVLMDemo":
        """Load a LLaVA-family checkpoint (default: the offline world model) like ``mmattn eval`` does."""
        from ..eval.harness import load_model_and_processor

        model_obj, processor, path = load_model_and_processor(model, device, dtype)
        if examples is None:
            examples = WorldExamples.offline_world(limit=NUM_EXAMPLES)
        return cls(model_obj, processor, path, examples, **kwargs)

    # -- inputs ---------------------------------------------------------------------------------------------
    def resolve_image(self, example: str | None, upload: str | None) -> tuple[Image.Image, str | None]:
        """(RGB image, example name or None). A chosen example wins over an upload (it carries ground truth)."""
        if example:
            if self.examples is None:
                raise DemoInputError("this demo has no example images; upload one")
            return Image.open(self.examples.path(example)).convert("RGB"), example
        if upload:
            return load_upload(upload), None
        raise DemoInputError("pick an example image or upload one")

    def extractor(self):
        """CHAIR's object extractor (needs NLTK data); None, with the reason kept, when it cannot be built."""
        if self._extractor is None and self._extractor_error is None:
            from ..eval.chair import ObjectExtractor
            from ..eval.io import EvalInputError

            try:
                self._extractor = ObjectExtractor()
            except EvalInputError as error:
                self._extractor_error = str(error)
        return self._extractor

    # -- generation -----------------------------------------------------------------------------------------
    def _inputs(self, image: Image.Image, prompt: str) -> dict:
        from ..eval.harness import build_prompt

        text = build_prompt(self.processor, prompt)
        return self.processor(images=[image], text=[text], return_tensors="pt").to(self.model.device)

    def stream(self, image: Image.Image, prompt: str, methods: Sequence[AttentionMethod],
               max_new_tokens: int) -> Iterator[str | RunResult]:
        """Greedy generation with ``methods`` (and an attention recorder) patched in.

        Yields the answer so far after every decoded piece, then one :class:`RunResult`. Generation runs in a
        worker thread (``TextIteratorStreamer``); its exceptions are re-raised here.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        recorder = ImageAttentionRecorder()
        inputs = self._inputs(image, prompt)
        failure: list[BaseException] = []
        cancelled = threading.Event()

        class StopWhenCancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

        def work() -> None:
            try:
                # The recorder goes last: an error about methods that cannot be combined then names only them.
                with torch.inference_mode(), mmattn.patch(self.model, *methods, recorder, processor=self.processor):
                    self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([StopWhenCancelled()]))
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                failure.append(error)
                streamer.end()  # unblock the reader

        worker = threading.Thread(target=work, name="mmattn-demo-generate", daemon=True)
        worker.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                yield text
        finally:
            # A closed generator (the user left) stops the worker, and nobody patches the model until it is out.
            cancelled.set()
            worker.join()
        if failure:
            raise failure[0]
        yield RunResult(answer=text.strip(), recorder=recorder)

    # -- analysis -------------------------------------------------------------------------------------------
    def objects(self, answer: str, example: str | None) -> dict[str, Any]:
        """Object mentions of ``answer`` and, for an example image, which of them are hallucinated (CHAIR)."""
        extractor = self.extractor()
        if extractor is None:
            return {"available": False, "reason": self._extractor_error}
        found = extractor.extract(answer) if answer.strip() else None
        mentioned = list(found.node_words) if found else []
        result: dict[str, Any] = {"available": True, "mentioned": sorted(set(mentioned))}
        if example is None or self.examples is None:
            result["ground_truth"] = None
            result["hallucinated"] = None
            result["reason"] = "uploaded image: no ground truth"
            return result
        truth = self.examples.ground_truth(example, extractor)
        hallucinated = [node for node in mentioned if node not in truth]
        result.update(
            ground_truth=sorted(truth),
            hallucinated=sorted(set(hallucinated)),
            correct=sorted(set(mentioned) & truth),
            chair_i=len(hallucinated) / len(mentioned) if mentioned else 0.0,
            mentions=len(mentioned),
        )
        return result

    def attention_summary(self, run: RunResult) -> tuple[np.ndarray, float]:
        """(patch grid of the answer's image attention, the fraction of its attention on that grid).

        For LLaVA-1.5 the grid is every image token; for LLaVA-NeXT it is the base view (crops are not drawn).
        """
        grid = image_patch_grid(run.recorder, self.grid_side)
        return grid, float(grid.sum())

    # -- the comparison -------------------------------------------------------------------------------------
    def compare(self, example: str | None, upload: str | None, prompt: str, method_spec: str,
                max_new_tokens: int) -> Iterator[dict[str, Any]]:
        """Baseline then patched generation; yields partial states (dicts) and finally the full result.

        Keys: ``baseline`` / ``patched`` (answer so far); after each run ``{run}_objects`` (:meth:`objects`) and
        ``{run}_heatmap`` (PIL image); at the end both heatmaps again on one colour scale, ``attention`` (image
        attention shares) and ``details`` (JSON-able).
        """
        prompt = (prompt or "").strip()
        if not prompt:
            raise DemoInputError("type a prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise DemoInputError(f"the prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
        max_new_tokens = int(max_new_tokens or self.default_max_new_tokens)
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise DemoInputError(f"max new tokens must lie in [1, {MAX_NEW_TOKENS}]")
        methods = parse_method_specs(method_spec)
        image, example = self.resolve_image(example, upload)
        self.extractor()  # before generating: it also makes the offline NLTK data findable (GIFT's tagger uses it)
        view = model_view(image, self.processor.image_processor)

        with self._lock:
            runs: dict[str, RunResult] = {}
            objects: dict[str, dict[str, Any]] = {}
            for key, run_methods in (("baseline", ()), ("patched", methods)):
                for item in self.stream(image, prompt, run_methods, max_new_tokens):
                    if isinstance(item, RunResult):
                        runs[key] = item
                    else:
                        yield {key: item}
                objects[key] = self.objects(runs[key].answer, example)
                grid, _ = self.attention_summary(runs[key])
                yield {  # this run's heatmap on its own scale, until both exist
                    key: runs[key].answer,
                    f"{key}_objects": objects[key],
                    f"{key}_heatmap": render_heatmap(view, grid, vmax=float(grid.max()),
                                                     kept=kept_patch_grid(runs[key].recorder, self.grid_side)),
                }

        grids = {key: self.attention_summary(run) for key, run in runs.items()}
        vmax = max(float(grid.max()) for grid, _ in grids.values())
        details = {
            "model": self.model_name,
            "image": {
                "source": "example" if example else "upload",
                "example": example,
                "image_id": self.examples.image_id(example) if example else None,
                "size": list(image.size),
                "model_view": list(view.size),
            },
            "prompt": prompt,
            "methods": [repr(m) for m in methods],
            "method_spec": method_spec.strip(),
            "heatmap": {"grid": self.grid_side, "vmax": vmax, "size": HEATMAP_SIZE},
        }
        final: dict[str, Any] = {}
        for key, run in runs.items():
            grid, image_share = grids[key]
            final[key] = run.answer
            final[f"{key}_objects"] = objects[key]
            kept = kept_patch_grid(run.recorder, self.grid_side)
            final[f"{key}_heatmap"] = render_heatmap(view, grid, vmax=vmax, kept=kept)
            details[key] = {
                "answer": run.answer,
                "generated_tokens": run.generated_tokens,
                "image_attention": image_share,
                "kept_patches": None if kept is None else int(kept.sum()),
                "objects": objects[key],
            }
        final["details"] = details
        pruned = any(details[key]["kept_patches"] is not None for key in runs)
        final["attention"] = {key: details[key]["image_attention"] for key in runs} | {"vmax": vmax, "pruned": pruned}
        yield final

    # -- the app --------------------------------------------------------------------------------------------
    def build_app(self) -> gr.Blocks:
        """The Gradio Blocks app (not launched). API endpoints: ``/compare`` and ``/hallucinations``."""
        return _build_app(self)


# ------------------------------------------------------------------------------------------- gradio layer

OUTPUT_KEYS = ("baseline", "patched", "baseline_objects", "patched_objects", "baseline_heatmap",
               "patched_heatmap", "attention", "details")


def attention_markdown(attention: dict[str, float]) -> str:
    """How much of the answer's attention went to the image, and what the heatmaps' brightest colour means."""
    return (
        f"Attention of the answer on image tokens: baseline **{attention['baseline']:.0%}**, with methods "
        f"**{attention['patched']:.0%}**. Brighter = more, on one square-root scale for both; the brightest colour "
        f"is {attention['vmax']:.1%} of the answer's attention on one patch."
        + (" Grey patches were pruned (kept patches only)." if attention.get("pruned") else "")
    )


def objects_markdown(objects: dict[str, Any] | None) -> str:
    """A short human summary of :meth:`LVLMDemo.objects`."""
    if not objects:
        return ""
    if not objects.get("available"):
        return f"_Hallucinated objects not computed: {objects.get('reason')}_"
    mentioned = ", ".join(objects["mentioned"]) or "none"
    if objects.get("ground_truth") is None:
        return f"Objects mentioned: {mentioned}  \n_{objects.get('reason')}: hallucinations not computed._"
    hallucinated = ", ".join(objects["hallucinated"]) or "none"
    correct = ", ".join(objects["correct"]) or "none"
    return (
        f"**Hallucinated objects:** {hallucinated}  \n**Correct objects:** {correct}  \n"
        f"CHAIRi {objects['chair_i']:.2f} over {objects['mentions']} mention(s); "
        f"ground truth: {', '.join(objects['ground_truth']) or 'none'}"
    )


def _build_app(demo: LVLMDemo) -> gr.Blocks:
    names = demo.examples.names if demo.examples else []
    pairs = slider_options()
    method_names = sorted(METHODS)
    default_methods = [name for name in DEFAULT_METHODS if name in METHODS]
    default_values = [_config_defaults(name)[option] for name, option in pairs]

    def to_outputs(state: dict[str, Any]) -> tuple:
        values = []
        for key in OUTPUT_KEYS:
            if key not in state:
                values.append(gr.skip())
            elif key.endswith("_objects"):
                values.append(objects_markdown(state[key]))
            elif key == "attention":
                values.append(attention_markdown(state[key]))
            else:
                values.append(state[key])
        return tuple(values)

    def compare(example, image, prompt, method_spec, max_new_tokens):
        """Baseline and patched answers, hallucinated objects, and attention heatmaps (streamed)."""
        # The event runs with preprocess=False: gradio would decode the upload before this function and answer a
        # file that is not an image with a bare "Error"; load_upload decodes it here, with a message. Gradio has
        # already checked that the file is an upload in its cache.
        upload = image.get("path") if isinstance(image, dict) else image
        with errors_as_messages("demo run", logger):
            yield ("", "", "", "", None, None, "", None)
            for state in demo.compare(example or None, upload or None, prompt, method_spec, max_new_tokens):
                yield to_outputs(state)

    def hallucinations(example: str, answer: str) -> dict:
        """CHAIR objects of ``answer`` for an example image: mentioned, hallucinated, correct, ground truth."""
        try:
            if example and demo.examples is not None:
                demo.examples.path(example)
            return demo.objects(answer or "", example or None)
        except DemoInputError as error:
            raise gr.Error(str(error), print_exception=False) from None

    def choose_example(name):
        if not name or name not in names:
            return gr.skip()  # an upload cleared the choice (keep the upload), or a typed name compare() will refuse
        return str(demo.examples.path(name))

    def update_spec(selected, *values):
        visibility = [gr.update(visible=name in (selected or [])) for name in option_groups]
        return (build_method_spec(selected or [], values), *visibility)

    with gr.Blocks(title="mmattn: LVLM attention methods", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as app:
        gr.Markdown(
            "# mmattn: what an attention method changes\n"
            f"Model `{Path(demo.model_name).name or demo.model_name}` on `{demo.model.device}`. The baseline and the "
            "patched model answer the same image and prompt (greedy decoding); heatmaps show the attention of the "
            "answer's tokens on each image patch, on one colour scale for both."
        )
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                if names:
                    gallery = gr.Gallery(
                        value=[(str(demo.examples.path(name)), name) for name in names[:NUM_GALLERY_EXAMPLES]],
                        label="Examples with ground truth (offline world val)", columns=6, height=170,
                        allow_preview=False, interactive=False, elem_id="examples",
                    )
                # Custom values reach compare(), which accepts only listed names with a short message (gradio's
                # own check would answer with the whole list).
                example = gr.Dropdown(choices=names, value=names[0] if names else None, label="Example image",
                                      info="has COCO ground truth: hallucinated objects are computed",
                                      allow_custom_value=True, elem_id="example")
                image = gr.Image(value=str(demo.examples.path(names[0])) if names else None, type="filepath",
                                 sources=["upload", "clipboard"], label="Image (an upload replaces the example)",
                                 height=220, elem_id="image")
                prompt = gr.Textbox(value=DEFAULT_PROMPT, label="Prompt", lines=2, max_length=MAX_PROMPT_CHARS,
                                    elem_id="prompt")
                methods = gr.CheckboxGroup(choices=[(METHODS[n].__name__, n) for n in method_names],
                                           value=default_methods, label="Methods", elem_id="methods")
                sliders = []
                option_groups: list[str] = []
                groups = []
                for name in sorted(MAIN_OPTIONS):
                    if name not in METHODS:
                        continue
                    with gr.Group(visible=name in default_methods) as group:
                        for option, (low, high, step, meaning) in MAIN_OPTIONS[name].items():
                            value = _config_defaults(name)[option]
                            sliders.append(gr.Slider(low, high, value=value, step=step, info=meaning,
                                                     label=f"{METHODS[name].__name__} {option}"))
                    option_groups.append(name)
                    groups.append(group)
                spec = gr.Textbox(value=build_method_spec(default_methods, default_values), lines=2,
                                  label="Method specs (one per line, as for --method; edit for more options)",
                                  elem_id="method-spec")
                max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=demo.default_max_new_tokens, step=1,
                                           label="Max new tokens")
                run = gr.Button("Compare", variant="primary", elem_id="run")
            with gr.Column(scale=3):
                with gr.Row(equal_height=False):
                    answers = [
                        gr.Textbox(label=f"{title} answer", lines=5, interactive=False, elem_id=f"{key}-answer")
                        for key, title in (("baseline", "Baseline"), ("patched", "With methods"))
                    ]
                with gr.Row(equal_height=False):
                    objects_boxes = [gr.Markdown(label=f"{title} objects", elem_id=f"{key}-objects")
                                     for key, title in (("baseline", "Baseline"), ("patched", "With methods"))]
                with gr.Row(equal_height=False):
                    heatmaps = [
                        gr.Image(label=f"{title}: image attention of the answer", type="pil", format="png",
                                 interactive=False, height=HEATMAP_SIZE, elem_id=f"{key}-heatmap")
                        for key, title in (("baseline", "Baseline"), ("patched", "With methods"))
                    ]
                attention = gr.Markdown(label="Image attention", elem_id="attention")
                with gr.Accordion("Details", open=False):
                    details = gr.JSON(label="Run details", elem_id="details")
        outputs = [*answers, *objects_boxes, *heatmaps, attention, details]

        if names:
            def pick(event: gr.SelectData):
                return names[event.index]

            gallery.select(pick, inputs=None, outputs=example, api_visibility="private", queue=False)
        example.change(choose_example, inputs=example, outputs=image, api_visibility="private", queue=False)
        image.upload(lambda: None, outputs=example, api_visibility="private", queue=False)
        for control in (methods, *sliders):
            control.change(update_spec, inputs=[methods, *sliders], outputs=[spec, *groups],
                           api_visibility="private", queue=False)
        run.click(compare, inputs=[example, image, prompt, spec, max_new_tokens], outputs=outputs,
                  api_name="compare", concurrency_limit=1, concurrency_id="model", preprocess=False)
        gr.api(hallucinations, api_name="hallucinations")
    return app


def launch(demo: LVLMDemo, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           prevent_thread_lock: bool = False, **kwargs: Any):
    """Build and launch the app with the demo's safety settings; returns the Blocks (``.close()`` stops it)."""
    app = demo.build_app()
    allowed = [str(demo.examples.image_dir)] if demo.examples else []
    app.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=1)
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=MAX_UPLOAD_BYTES,
        allowed_paths=allowed,
        show_error=False,
        prevent_thread_lock=prevent_thread_lock,
        quiet=prevent_thread_lock,
        **kwargs,
    )
    return app
