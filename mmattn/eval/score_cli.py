"""``mmattn eval chair-score`` and ``mmattn eval pope-score``: score existing outputs, print one JSON object.

Scoring needs no model, so these commands are also the way to re-score results produced elsewhere (OPERA-style
caption JSONL, LLaVA answer files) with every reference variant. Heavy imports (nltk, pycocotools) happen only
when a command runs, so the rest of the CLI stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from .io import EvalInputError


def register(commands: argparse._SubParsersAction) -> None:
    """Add the scoring subcommands to the ``mmattn eval`` group."""
    from .chair import DEFAULT_VARIANT, VARIANTS
    from .pope import DEFAULT_PARSER, PARSERS

    chair = commands.add_parser(
        "chair-score",
        help="CHAIR metrics of generated captions (JSON object on stdout)",
        description="Score generated captions with CHAIR. Prints one JSON object with CHAIRs, CHAIRi, Recall, "
        "Len, Precision, F1 (fractions; Len = mean tokens per caption after the double-word merge) and n.",
    )
    chair.add_argument(
        "--captions", required=True, metavar="FILE.jsonl", help="one {image_id, caption} object per line"
    )
    chair.add_argument(
        "--annotations",
        required=True,
        metavar="DIR",
        help="COCO annotations directory with instances_*.json and captions_*.json (2014 or 2017), "
        "or a JSON file {image_id: [objects]}",
    )
    chair.add_argument(
        "--variant",
        choices=VARIANTS,
        default=DEFAULT_VARIANT,
        help="token normaliser: opera = nltk POS + WordNet lemma (OPERA/PAI/HALC; default), "
        "original = pattern singularize (Rohrbach et al.)",
    )
    chair.add_argument("--image-id-key", default="image_id", help="key of the COCO image id (default: image_id)")
    chair.add_argument("--caption-key", default="caption", help="key of the caption text (default: caption)")
    chair.add_argument(
        "--per-caption", metavar="OUT.jsonl", help="also write per-caption words, objects and metrics (atomically)"
    )
    chair.set_defaults(func=_chair_score)

    pope = commands.add_parser(
        "pope-score",
        help="POPE metrics of yes/no answers per split (JSON object on stdout)",
        description="Score POPE answers. Prints one JSON object per split with accuracy, precision, recall, f1, "
        "yes_ratio, tp, fp, tn, fn and n. Answers are matched to questions by question_id.",
    )
    pope.add_argument("--answers", required=True, metavar="FILE.jsonl", help="one {question_id, answer|text} per line")
    pope.add_argument(
        "--questions",
        required=True,
        metavar="FILE",
        help="official POPE file (coco_pope_{split}.json) or LLaVA's combined question file (with category)",
    )
    pope.add_argument(
        "--labels",
        metavar="DIR",
        help="LLaVA convention: the k-th question of category c takes the label of line k of DIR/coco_pope_{c}.json",
    )
    pope.add_argument(
        "--parser",
        choices=PARSERS,
        default=DEFAULT_PARSER,
        help="answer parser: official (RUCAIBox/LLaVA; default), opera (OPERA/PAI/HALC), vcd",
    )
    pope.add_argument("--answer-key", help="key of the answer text (default: 'answer', else 'text')")
    pope.add_argument(
        "--allow-partial",
        action="store_true",
        help="score a split whose questions are only partly answered (default: that is an error)",
    )
    pope.set_defaults(func=_pope_score)


def _user_error(error: Exception):
    from mmattn.cli import CLIError

    return CLIError(str(error).replace("\n", " "))


def _chair_score(args: argparse.Namespace) -> int:
    from .chair import evaluate_chair
    from .io import write_jsonl_atomic

    try:
        result = evaluate_chair(
            args.captions,
            args.annotations,
            args.variant,
            image_id_key=args.image_id_key,
            caption_key=args.caption_key,
        )
        if args.per_caption:
            write_jsonl_atomic(args.per_caption, result.per_caption)
    except (EvalInputError, OSError) as error:
        raise _user_error(error) from None
    json.dump(result.summary, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _pope_score(args: argparse.Namespace) -> int:
    from .pope import evaluate_pope

    try:
        results = evaluate_pope(
            args.answers,
            args.questions,
            args.labels,
            args.parser,
            answer_key=args.answer_key,
            allow_partial=args.allow_partial,
        )
    except (EvalInputError, OSError) as error:
        raise _user_error(error) from None
    json.dump(results, sys.stdout)
    sys.stdout.write("\n")
    return 0
