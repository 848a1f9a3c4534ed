"""The core stays light: importing prune_plugin pulls in neither the integrations nor their
libraries, and the command line runs as a module."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_core_import_does_not_load_integrations_or_hf_libraries():
    code = ("import sys, prune_plugin; "
            "heavy = [m for m in ('transformers', 'datasets', 'deepspeed', 'yaml', "
            "'prune_plugin.integrations') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_python_dash_m_prints_the_policy_schema():
    out = subprocess.run([sys.executable, "-m", "prune_plugin", "schema"], capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout)["title"] == "PruningPolicy"


def test_integrations_are_installed_as_a_subpackage():
    import prune_plugin.integrations.transformers as hf

    # the top-level integrations/ folder is what the package exposes as prune_plugin.integrations
    assert Path(hf.__file__).resolve() == REPO / "integrations" / "transformers.py"
    import prune_plugin.integrations.job.run_folder as run_folder  # the job: its own subpackage

    assert Path(run_folder.__file__).resolve() == REPO / "integrations" / "job" / "run_folder.py"
