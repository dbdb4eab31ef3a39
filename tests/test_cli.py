import json
import subprocess
import sys

from mmattn.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 0
    assert "info" in capsys.readouterr().out


def test_info_json_reports_versions_and_kernels(capsys):
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    import torch
    import transformers

    assert facts["torch"] == torch.__version__ and facts["transformers"] == transformers.__version__
    assert isinstance(facts["triton_kernels"]["usable"], bool) and facts["triton_kernels"]["detail"]
    assert "role_bias" in facts["methods"]
    assert "(pipeline: yes)" in facts["offline_data"]["video_world"]
    assert "(model: yes, val images: 500)" in facts["offline_data"]["world"]


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "mmattn.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("mmattn ")
