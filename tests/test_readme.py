"""The README's set-up commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(ci) == 1
    assert ci[0] in (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_end_to_end_tier():
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("python -m pytest")]
    assert ci == ["python -m pytest -v -m slow"]
    assert f"`{ci[0]}`" in (ROOT / "README.md").read_text()


def test_readme_demo_command_runs_the_demo_config():
    readme = (ROOT / "README.md").read_text()
    demo = [line for line in readme.splitlines() if line.startswith("python3 -m venv") and "study run" in line]
    assert len(demo) == 1 and "pip install torch==2.13.0 && " in demo[0]
    assert "tune_configs/demo.yaml" in demo[0] and (ROOT / "tune_configs/demo.yaml").exists()
