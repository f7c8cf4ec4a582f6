"""The repository's promises: CI runs the README's test command; the package layout is as documented."""
import os
import re
import subprocess
import sys

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


def test_triton_kernels_install_under_fastvar(tmp_path):
    import fastvar.triton_kernels as tk
    assert os.path.dirname(tk.__file__).endswith("triton_kernels")
    # from anywhere but the repository root, `import triton_kernels` must never find fastvar's folder
    code = "import importlib.util as u; s = u.find_spec('triton_kernels'); print(s.origin if s else None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not out.stdout.strip().startswith(ROOT), f"a top-level triton_kernels resolves to fastvar's: {out.stdout}"


def test_public_api():
    for name in ("VAR", "VQVAE", "build_vae_var", "load_vae_var", "patch", "Sampler", "__version__"):
        assert hasattr(fastvar, name), name
