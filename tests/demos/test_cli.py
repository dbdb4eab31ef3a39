"""``mmattn demo``: registered in the top-level CLI, local-only by default."""

from __future__ import annotations

from mmattn.cli import build_parser, main


def test_demo_commands_are_registered_and_private_by_default(capsys):
    assert main(["demo"]) == 0
    listing = capsys.readouterr().out
    assert "lvlm" in listing and "video" in listing
    for command in ("lvlm", "video"):
        args = build_parser().parse_args(["demo", command])
        assert args.host == "127.0.0.1" and args.share is False and args.model is None
    args = build_parser().parse_args(["demo", "lvlm", "--model", "some/model", "--port", "8000", "--share"])
    assert (args.model, args.port, args.share) == ("some/model", 8000, True)


def test_video_demo_refuses_a_model_path_that_is_not_a_pipeline(tmp_path, capsys):
    assert main(["demo", "video", "--model", str(tmp_path)]) == 2
    assert "not a local diffusers pipeline folder" in capsys.readouterr().err
