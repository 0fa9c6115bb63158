"""The command-line layer: light imports (fast `--help`, torch-free `flops`), every subcommand's
help, quiet output (third-party noise hidden unless -v) and the library/CLI boundary."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import fastv_export
from fastv_export import cli

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)


# --- (a) light imports ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["flops", "--help"],
                                  ["flops", "--model-config", "llava-1.5-13b", "--k", "2", "--r", "50%"]])
def test_help_and_flops_import_neither_torch_nor_transformers(argv):
    proc = _python(f"""
        import sys
        from fastv_export.cli import build_parser, main
        build_parser()
        try:
            rc = main({argv!r})
        except SystemExit as exc:   # --help
            rc = exc.code
        heavy = sorted(m for m in ("torch", "transformers", "onnx", "onnxruntime") if m in sys.modules)
        print("RC", rc, "HEAVY", heavy)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "RC 0 HEAVY []" in proc.stdout, proc.stdout + proc.stderr


def test_presets_names_import_without_torch():
    proc = _python("""
        import sys
        from fastv_export.presets import DEFAULT_MODEL, PRESETS, build_preset_config, load_model
        assert "torch" not in sys.modules and "transformers" not in sys.modules
    """)
    assert proc.returncode == 0, proc.stderr


# --- (b) help --------------------------------------------------------------------------------------


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_subcommand(capsys):
    out = _help([], capsys)
    assert "examples:" in out
    for name in cli.SUBCOMMANDS:
        assert re.search(rf"^\s+{name}\s", out, re.M), name


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_subcommand_help_shows_its_examples(name, capsys):
    assert cli.SUBCOMMANDS[name] == f"fastv_export.commands.{name}"
    out = _help([name], capsys)
    assert "examples:" in out
    assert f"fastv-export {name} " in out.split("examples:", 1)[1]


@pytest.mark.parametrize("name, ranking", [("generate", True), ("export", True), ("flops", False)])
def test_shared_fastv_group(name, ranking, capsys):
    out = _help([name], capsys)
    group = out.split("\nFastV:\n", 1)[1]
    for option in ("--k K", "--r R", "--keep N"):
        assert option in group, option
    assert ("--ranking" in group) == ranking and ("--seed" in group) == ranking
    with pytest.raises(SystemExit) as exc:                     # --r and --keep exclude each other
        cli.main([name, "--r", "1/2", "--keep", "3", *(["--out", "unused"] if name == "export" else [])])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_export_precisions_are_the_exporters():
    import torch

    from fastv_export.export.onnx_export import DTYPES
    from fastv_export.graphs import spec

    assert DTYPES == {"fp32": torch.float32, "fp16": torch.float16}
    assert list(DTYPES) == list(spec.PRECISIONS)


def test_no_subcommand_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "<subcommand>" in capsys.readouterr().out


def test_quiet_mode_restores_warning_filters_and_environment(capsys):
    filters = list(warnings.filters)
    torch_logs = os.environ.get("TORCH_LOGS")
    assert cli.main(["flops", "--model-config", "llava-1.5-7b", "--json"]) == 0
    capsys.readouterr()
    assert warnings.filters == filters and os.environ.get("TORCH_LOGS") == torch_logs


# --- (c) quiet output ------------------------------------------------------------------------------

# third-party noise: torch's glog-style log prefix (W1126 00:08:58.627000 ...), warnings, torchvision notes
NOISE = re.compile(r"^[WEI]\d{4} \d\d:\d\d|torchvision|FutureWarning|DeprecationWarning|UserWarning")


@pytest.mark.slow
def test_export_output_has_no_third_party_noise(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    proc = subprocess.run([sys.executable, "-m", "fastv_export.cli", "export", "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    # tqdm redraws its bar with carriage returns: a log line may follow a bar on the same line
    segments = [s.strip() for s in re.split(r"[\r\n]", proc.stdout + proc.stderr) if s.strip()]
    noise = [s for s in segments if NOISE.search(s)]
    assert not noise, "\n".join(noise[:10])
    assert any(s.startswith("wrote ") for s in segments)


# --- (d) the library does not depend on the CLI --------------------------------------------------------


def _library_files() -> list[Path]:
    import fastv_export.calibrate
    import fastv_export.graphs

    package = Path(fastv_export.__file__).parent
    roots = [package, Path(fastv_export.graphs.__file__).parent, Path(fastv_export.calibrate.__file__).parent]
    files = [f for root in roots for f in root.rglob("*.py")]
    return [f for f in files if f != package / "cli.py" and package / "commands" not in f.parents]


def _cli_references(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):   # importlib.import_module("...")
            names = [node.value]
        found += [n for n in names if n == "argparse" or re.fullmatch(r"fastv_export\.(commands|cli)(\..*)?", n)]
    return found


def test_library_modules_import_neither_argparse_nor_the_commands():
    files = _library_files()
    assert len(files) > 20
    offenders = {str(f.relative_to(f.parents[1])): refs for f in files if (refs := _cli_references(f))}
    assert not offenders
