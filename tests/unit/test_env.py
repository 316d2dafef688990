"""The environment recorded with every run (issue #44 point 2): ``fedsim --version``, and what ``summary.json`` and the
W&B config hold (``tests/integration/test_cli.py`` reads a run's)."""

from importlib import metadata

import pytest
import torch

from fedsim.cli import main
from fedsim.env import environment


def test_the_environment_names_versions_the_torch_build_and_the_device():
    env = environment()
    assert env["fedsim"] and env["python"].count(".") == 2
    assert env["packages"]["transformers"] == metadata.version("transformers")
    assert env["packages"]["peft"] == metadata.version("peft") and env["packages"]["ray"] == metadata.version("ray")
    assert env["torch"]["build"] == torch.__version__
    assert env["torch"]["devices"] == (["cpu"] if not torch.cuda.is_available() else
                                       [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])


def test_version_prints_one_line(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("fedsim ") and f"torch {torch.__version__}" in out
