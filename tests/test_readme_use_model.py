"""The README's "Use a trained model" commands, run verbatim on the CPU in a fresh directory.

The bash blocks of that section are run line by line with bash: train a small run,
export it to Hugging Face and llm.c files, load the export in transformers, fine-tune from the
llm.c file, generate, build a HellaSwag eval file and score it. One line is changed: the
HellaSwag download (no network here) reads a small local jsonl through the `--source` flag its
comment names. The hub fine-tune block needs the network and is not run.

Run: python -m pytest tests/test_readme_use_model.py -q      (slow: ~1 minute on 2 cores)
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use a trained model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


@pytest.mark.slow
def test_use_a_trained_model_commands(tmp_path):
    pytest.importorskip("transformers")
    blocks = [b for b in readme_blocks() if "openai-community" not in b]  # no network here
    assert len(blocks) == 2, "the section should hold the export and generate/eval blocks"
    jsonl = tmp_path / "hs.jsonl"
    jsonl.write_text("".join(json.dumps(
        {"ind": i, "ctx": f"The cook takes a knife and {i}", "label": i % 4,
         "endings": ["cuts the bread.", "sings.", "flies away.", "is blue."]}) + "\n"
        for i in range(6)))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for line in "\n".join(blocks).splitlines():
        if not line.strip():
            continue
        if line.startswith("python -m data_tools.hellaswag"):
            line = line.split("#")[0] + f" --source {jsonl}"
        r = subprocess.run(["bash", "-c", line.replace("python ", f"{sys.executable} ", 1)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README line failed: {line}\n{r.stderr[-2000:]}"
        if line.startswith("python -m llmc.generate"):
            assert r.stdout.startswith("ROMEO:")
        if line.startswith("python -m llmc.eval"):
            assert "acc_norm" in r.stdout and "(6 examples" in r.stdout
    assert (tmp_path / "out" / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "out2" / "metrics.jsonl").is_file()
