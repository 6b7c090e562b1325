"""The README's Megatron-LM commands do not drift: every ``--spec MODULE NAME`` it names resolves as
Megatron-LM's ``pretrain_gpt.py`` resolves it (``spec_utils.import_module``) to a ``ModuleSpec`` with NSA's
attention, the README's own ``my_nsa_spec.py`` included; with Megatron-LM's source in ``megatron-lm/``
(``scripts/fetch_megatron_lm.sh``), its one-GPU command also passes Megatron-LM's argument parsing and builds a
model that runs forward and backward (so every TransformerConfig field NSA refuses is set as it needs)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from megatron.core.transformer.spec_utils import ModuleSpec, import_module  # noqa: E402

from nsa_parallel.megatron import NSASelfAttention  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# What the README says must not be passed: the function that makes a spec, not a spec.
NOT_A_SPEC = ("nsa_parallel.megatron.specs", "get_gpt_layer_nsa_spec")


def _specs() -> set[tuple[str, str]]:
    """Every ``--spec MODULE NAME`` in the README, in commands and in prose (lines joined)."""
    return set(re.findall(r"--spec\s+([a-z_][\w.]*)\s+([a-z_]\w*)", README.replace("\\\n", " ")))  # not MODULE NAME


def test_readme_specs_resolve_to_nsa_module_specs(tmp_path, monkeypatch):
    specs = _specs()
    assert {("nsa_parallel.megatron.paper_spec", "layer_spec"), ("my_nsa_spec", "layer_spec"), NOT_A_SPEC} <= specs
    # The user's module, as the README shows it
    block = re.search(r"```python\n# my_nsa_spec.py\n(.*?)```", README, re.S).group(1)
    (tmp_path / "my_nsa_spec.py").write_text(block)
    monkeypatch.syspath_prepend(str(tmp_path))
    for module, name in specs:
        spec = import_module((module, name))  # what gpt_builders.gpt_builder does with args.spec
        if (module, name) == NOT_A_SPEC:
            assert callable(spec) and not isinstance(spec, ModuleSpec)
            continue
        assert isinstance(spec, ModuleSpec), (module, name)
        assert spec.submodules.self_attention.module is NSASelfAttention, (module, name)


@pytest.mark.skipif(not (ROOT / "megatron-lm" / "pretrain_gpt.py").is_file(),
                    reason="needs Megatron-LM's source in megatron-lm/ (scripts/fetch_megatron_lm.sh)")
def test_readme_one_gpu_command_passes_megatron_lms_argument_parsing_and_runs():
    block = re.search(r"```bash\n# one GPU, no Transformer Engine or apex\n(.*?)```", README, re.S).group(1)
    words = shlex.split(block.replace("\\\n", " "))
    args = words[words.index("megatron-lm/pretrain_gpt.py") + 1:]
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_megatron_lm_args.py"),
                          str(ROOT / "megatron-lm"), "--forward", "64", "--", *args], check=False,
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ModuleSpec of TransformerLayer, self_attention NSASelfAttention" in run.stdout
