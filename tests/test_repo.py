"""The repository's promises: CI runs the README's test command; the package layout is as documented."""
import importlib.util
import os
import re

import fastvar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    main_cmd, test_cmd = _readme_commands()
    assert "setup.sh" in main_cmd and "fastvar sample" in main_cmd
    assert "setup.sh test" in test_cmd and "pytest" in test_cmd
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert test_cmd in ci.splitlines(), "CI must run the README's test command verbatim"


def test_triton_kernels_install_under_fastvar():
    import fastvar.triton_kernels as tk
    assert os.path.dirname(tk.__file__).endswith("triton_kernels")
    spec = importlib.util.find_spec("triton_kernels")
    assert spec is None or not (spec.origin or "").startswith(ROOT), "fastvar must not ship a top-level triton_kernels"


def test_public_api():
    for name in ("VAR", "VQVAE", "build_vae_var", "load_vae_var", "patch", "Sampler", "__version__"):
        assert hasattr(fastvar, name), name
